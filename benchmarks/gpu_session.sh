#!/usr/bin/env bash
# The GPU benchmarks as one prepared call of a lent device machine (one H100/H200, its own Python with torch,
# timm and tensorboard, no network).
#
#   bash benchmarks/gpu_session.sh prepare   here, with PyPI: the pure-Python wheels slip needs that the device
#                                            image lacks, into .whl/ (git-ignored; about 1.2 MB)
#   bash benchmarks/gpu_session.sh run       there, with .whl carried and $OUT set: the full suite (results written
#                                            after every section, so a cut-short run keeps what it measured), a
#                                            short bf16 slip.train run with device-side augmentation, the
#                                            compiled ViT-B/16 SLIP step, then the accumulation tests on CUDA
#                                            (exact accumulation's random-state replay on the device's generator),
#                                            then FSDP against DDP on every GPU there (step time, step memory,
#                                            weights + gradients + AdamW per rank; benchmarks/fsdp_step_time.py);
#                                            everything lands under $OUT
#
# The run stays inside one 600 s call: SUITE_S + TRAIN_S + COMPILED_S + TESTS_S + FSDP_S seconds at most
# (defaults 330 + 60 + 100 + 40 + 60).
# SUITE_ARGS adds suite.py arguments (`--quick` checks the whole script on a CPU in a few minutes).
set -euo pipefail

prepare() {
    rm -rf .whl && mkdir -p .whl
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_17_x86_64 --platform any --dest .whl \
        "hydra-core>=1.3,<1.4" "omegaconf>=2.3,<2.4" "ftfy>=6.1" wcwidth "pytest>=7.4" pluggy iniconfig pygments packaging
    # omegaconf's parser runtime is an sdist alone on PyPI; it is pure Python, so a wheel built here serves.
    python3 -m pip wheel --quiet --no-deps --wheel-dir .whl "antlr4-python3-runtime==4.9.3"
    ls .whl
}

run() {
    local out=${OUT:?set OUT to the folder whose files come back}
    local suite_args=(${SUITE_ARGS:-})
    python3 -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
    exec > >(tee "$out/log.txt") 2>&1
    nvidia-smi -L || true
    python3 -c "import torch, slip; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
    timeout "${SUITE_S:-330}" python3 benchmarks/suite.py "${suite_args[@]}" --out "$out/gpu" \
        || echo "suite: stopped with status $? (what it finished is under $out/gpu)"
    timeout "${TRAIN_S:-60}" python3 -m slip.train loss=slip augment.backend=device trainer.max_steps=60 \
        hydra.run.dir=/tmp/gpu_session_train || echo "slip.train: stopped with status $?"
    timeout "${COMPILED_S:-100}" python3 benchmarks/suite.py "${suite_args[@]}" --compile --sections train \
        --models vit_b16 --objectives slip --out "$out/gpu" || echo "compiled step: stopped with status $?"
    timeout "${TESTS_S:-40}" python3 -m pytest -q -p no:cacheprovider tests/test_accumulation.py -k cuda \
        || echo "accumulation tests on CUDA: stopped with status $?"
    local gpus
    gpus=$(python3 -c "import torch; print(torch.cuda.device_count())")
    timeout "${FSDP_S:-60}" python3 benchmarks/fsdp_step_time.py --device cuda --world "$gpus" --model vit_b16 \
        --batch 64 --rounds 3 --steps 3 --out "$out/fsdp_step_time" || echo "fsdp vs ddp: stopped with status $?"
}

case "${1:-}" in
    prepare) prepare ;;
    run) run ;;
    *) echo "usage: bash benchmarks/gpu_session.sh prepare|run" >&2; exit 2 ;;
esac
