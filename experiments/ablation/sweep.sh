#!/usr/bin/env bash
# Objective x ssl_scale x augmentation strength, as Hydra multiruns into one sweep dir, then eval and report.
# ssl_scale exists only for SLIP and colour-jitter strength only matters where there are SSL views, so the grid
# is SLIP's, plus the SimCLR and CLIP baselines. Extra arguments go to every training run, e.g.
#   experiments/ablation/sweep.sh trainer.max_steps=50
set -euo pipefail
OUT=${OUT:-runs}
python -m slip.train -m experiment=ablation output_root="$OUT" loss=slip loss.ssl_scale=0.5,1.0,2.0 \
  augment.jitter_strength=0.5,1.0 "$@"
python -m slip.train -m experiment=ablation output_root="$OUT" loss=simclr augment.jitter_strength=0.5,1.0 "$@"
python -m slip.train -m experiment=ablation output_root="$OUT" loss=clip "$@"
python -m slip.eval checkpoint="$OUT/ablation"
python -m slip.report "$OUT/ablation" --title "SLIP ablation: objective x ssl_scale x jitter strength"
