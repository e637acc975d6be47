#!/usr/bin/env bash
# CLIP with each self-supervised term beside it (experiment=ssl_terms) on the embedded synthetic data, then
# zero-shot, linear probe, kNN and retrieval for each run, then one report. The committed results in
# experiments/ssl_terms/results/ came from exactly this script on a 2-core CPU. Extra arguments go to every run.
#
# DINO's preset (65,536 prototypes, 8 local crops) trains at about 15 img/s on 2 cores, a quarter of the others'
# speed, so this script runs it at a CPU size: 4,096 prototypes and 4 local crops (16 px); every other preset runs
# as shipped. `python -m slip.train -m experiment=ssl_terms` alone runs all eight as shipped.
set -euo pipefail
OUT=${OUT:-runs}
RESULTS=${RESULTS:-experiments/ssl_terms/results}
python -m slip.train -m experiment=ssl_terms output_root="$OUT" \
  loss=clip,clip_simclr,clip_byol,clip_mocov3,clip_vicreg,clip_barlow,siglip_simclr "$@"
python -m slip.train -m experiment=ssl_terms output_root="$OUT" loss=clip_dino \
  loss.terms.dino.objective.out_dim=4096 loss.terms.dino.objective.local_crops=4 "$@"
python -m slip.eval checkpoint="$OUT/ssl_terms"
python -m slip.report "$OUT/ssl_terms" --out "$RESULTS" \
  --title "SSL terms beside CLIP: tiny ViT, 200 steps on synthetic shapes"
