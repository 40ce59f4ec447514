#!/usr/bin/env bash
# The GPU half of the benchmarks, planned for one session's 30 minutes of device time.
#
# The device machine has PyTorch but no diffusers or denoising-diffusion-pytorch, and no network.
# Here (with PyPI), once:   bash bench/gpu_suite.sh wheels      # -> .whl/ (git-ignored, ~6.5 MB)
# Then one device `run` per part, each well inside a call's 10 minutes, with carry [".whl"]:
#   bash bench/gpu_suite.sh tests    # ~2 min: the CUDA tests (graph replay, GPU vs CPU forward in fp32, channels_last, bf16)
#   bash bench/gpu_suite.sh train    # ~8 min: training throughput, float32 and with every GPU option
#   bash bench/gpu_suite.sh sample   # ~8 min: sampling throughput, DDPM-1000 / DDIM-50, 50k projection
#   bash bench/gpu_suite.sh extra    # ~8 min, if time is left: lucidrains compiled, ours not compiled
# Every part writes its log and a copy of bench/RESULTS.md (with its new entries) to $OUT; merge
# the entries back into the repository's bench/RESULTS.md by hand. Budget timings above are plans,
# not measurements: each step has its own `timeout` so that a slow one cannot eat the whole call.
# Checked on the CPU (2026-11-23): `tests` runs whole; train_throughput and sample_throughput run
# with every option at once (--compile --channels-last --bf16 --fused / --cuda-graph) on small presets.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}

install_wheels() {
    # Into a side folder, without dependencies: the machine's own torch, numpy, accelerate stay.
    [ -d .whl ] || { echo "no .whl/: run 'bash bench/gpu_suite.sh wheels' where PyPI is reachable and carry .whl"; exit 2; }
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 2
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
}

step() {  # step SECONDS NAME COMMAND...: run with a time limit, log to $OUT/NAME.log
    local limit=$1 name=$2
    shift 2
    echo "=== $name (limit ${limit}s): $*"
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    echo "=== $name: exit ${PIPESTATUS[0]}"
}

case "${1:-}" in
wheels)
    mkdir -p .whl
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
        diffusers==0.42.1 denoising-diffusion-pytorch==2.3.4 ema-pytorch==0.8.3 pytorch-fid==0.3.0 \
        importlib_metadata==10.2.0
    ls -la .whl
    ;;
tests)
    install_wheels
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
    $PY -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)"
    step 300 tests $PY -m pytest -q -x tests/test_bench_cuda_graph.py tests/test_bench_smoke.py tests/test_unet.py
    ;;
train)
    install_wheels
    # float32 as each library ships, then every GPU option on ours, diffusers and lucidrains, with
    # diffusers' example setup (float32, AdamW, no compile) alongside as the target's baseline.
    step 150 train_fp32 $PY -m bench.train_throughput --device cuda --batch 128 --repeats 20 --warmup 3 \
        --models ours,diffusers,lucidrains --append
    step 330 train_fast $PY -m bench.train_throughput --device cuda --batch 128 --repeats 20 --warmup 3 \
        --models ours,diffusers,diffusers-example --bf16 --channels-last --fused --compile --append
    cp bench/RESULTS.md "$OUT/RESULTS.md"
    ;;
extra)
    install_wheels
    # What did not fit in the calls above: lucidrains with every option (a third compile), and ours
    # without compile, to show what compile adds.
    step 300 train_fast_lucidrains $PY -m bench.train_throughput --device cuda --batch 128 --repeats 20 \
        --warmup 3 --models ours,lucidrains --bf16 --channels-last --fused --compile --append
    step 200 train_nocompile $PY -m bench.train_throughput --device cuda --batch 128 --repeats 20 --warmup 3 \
        --models ours,diffusers-example --bf16 --channels-last --fused --append
    cp bench/RESULTS.md "$OUT/RESULTS.md"
    ;;
sample)
    install_wheels
    # Batch 500: 100 chains of it are the 50k images of an FID. 100 timed steps, projected to 1000.
    step 150 sample_fp32 $PY -m bench.sample_throughput --device cuda --preset cifar10 --batch 500 \
        --timed-steps 100 --repeats 3 --append
    step 150 sample_graph $PY -m bench.sample_throughput --device cuda --preset cifar10 --batch 500 \
        --timed-steps 100 --repeats 3 --bf16 --channels-last --cuda-graph --append
    step 200 sample_compile $PY -m bench.sample_throughput --device cuda --preset cifar10 --batch 500 \
        --timed-steps 100 --repeats 3 --bf16 --channels-last --compile --cuda-graph --append
    cp bench/RESULTS.md "$OUT/RESULTS.md"
    ;;
*)
    sed -n '2,15p' "$0"
    exit 2
    ;;
esac
