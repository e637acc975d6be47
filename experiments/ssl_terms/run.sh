#!/usr/bin/env bash
# CLIP with each self-supervised term beside it (experiment=ssl_terms: clip, clip_simclr, clip_dino, clip_byol,
# clip_mocov3, clip_vicreg, clip_barlow, siglip_simclr) on the embedded synthetic data, then zero-shot, linear
# probe, kNN and retrieval for each run, then one report. The committed results in experiments/ssl_terms/results/
# came from exactly this script on a 2-core CPU. Extra arguments go to every training run.
set -euo pipefail
OUT=${OUT:-runs}
RESULTS=${RESULTS:-experiments/ssl_terms/results}
python -m slip.train -m experiment=ssl_terms output_root="$OUT" "$@"
python -m slip.eval checkpoint="$OUT/ssl_terms"
python -m slip.report "$OUT/ssl_terms" --out "$RESULTS" \
  --title "SSL terms beside CLIP: tiny ViT, 200 steps on synthetic shapes"
