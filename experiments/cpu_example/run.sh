#!/usr/bin/env bash
# The CPU end-to-end example: CLIP vs SimCLR vs SLIP on the embedded synthetic data (tiny ViT, 200 steps each),
# then zero-shot, linear probe, kNN and retrieval for each run, end-to-end fine-tuning of each run's image tower
# (recipe=cpu), and the comparison report with the three settings side by side. The committed results in
# experiments/cpu_example/results/ came from exactly this script on a 2-core CPU.
set -euo pipefail
OUT=${OUT:-runs/cpu_example}
RESULTS=${RESULTS:-experiments/cpu_example/results}
python -m slip.train -m loss=clip,simclr,slip output_root="$OUT" hydra.sweep.dir="$OUT/sweep"
python -m slip.eval checkpoint="$OUT/sweep"
python -m slip.finetune -m checkpoint="$OUT/sweep/0_loss-clip,$OUT/sweep/1_loss-simclr,$OUT/sweep/2_loss-slip" \
    output_root="$OUT"
python -m slip.report "$OUT/sweep" --out "$RESULTS" --title "CPU example: tiny ViT, 200 steps on synthetic shapes"
