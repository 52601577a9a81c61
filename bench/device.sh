#!/usr/bin/env bash
# All the GPU work of issues 9 (packed runs) and 12 (compiled step) in one command: at most 7 minutes on
# one H100/H200 (each step below has a time cap), at most 8 files under $OUT, the tables printed last.
#   OUT=/tmp/out bash bench/device.sh
# The lent GPU machines' image has torch 2.11, Triton, pytest, PyYAML, safetensors and tqdm but not
# pydantic: carry wheels of pydantic, pydantic-core, annotated-types and typing-inspection (python 3.12,
# manylinux x86_64) in .whl/ (the device tool's README gives the pip download line); they are installed
# into /tmp/site here. mixkd runs from this checkout (PYTHONPATH), nothing else is installed.
#
# What it measures, on random uint8 images of CIFAR's shape (the step's cost does not depend on them):
#  1. tests.txt (cap 110 s): pytest tests/test_step.py tests/test_compile.py and the CUDA tests of
#     tests/test_pack.py and tests/test_resume.py: graphed == eager over 20 steps (fp32, bf16); the compiled
#     graphed step == the uncompiled one over 20 steps, losses and weights (fp32 and bf16 with teacher and
#     student compiled; bf16 with the mixing and losses compiled too); TrainStep.measure leaves a graphed run
#     as it was; three different runs packed on streams == the same runs alone; a run stopped mid-epoch and
#     resumed == the uninterrupted run (fp32, bf16), all within the graphed-vs-eager tolerance.
#  2. bench.txt / bench.json / bench.log (cap 220 s): bench/step_bench.py, bf16 + channels-last, PMU 10% +
#     standardized KD, batch 64, 200 steps after 20, for resnet32x4 -> resnet8x4, resnet56 -> resnet20 and
#     wrn_40_2 -> wrn_16_2: d (one run, CUDA graph), e (batch 512, the ceiling), g / h (d / e with teacher
#     and student compiled; compile seconds beside them), p / q (K = 2, 4, 8 runs of the pair in one
#     mixkd.pack.Pack, each on its own CUDA stream; uncompiled / compiled), a mixed pack (one run of each
#     pair), the warm-up of 1 and 8 compiled runs of the first pair from an empty dynamo cache, and the
#     issues' targets as ratios: issue 9 best K >= 90% of e, mixed pack >= 80% of the mean e; issue 12
#     g >= 20x the released loop on the same GPU kind (../shared/REFERENCE.md), best compiled K >= e,
#     8 compiled runs' warm-up <= 2x one run's.
#  3. try.txt / try.json / try.log (cap 75 s): issue 12's "also try", resnet32x4 -> resnet8x4: g beside
#     s (one-hot labels, mixing and losses compiled too) and m (inductor mode max-autotune-no-cudagraphs).
# A benchmark stopped by its cap still prints (and writes) what it measured. inductor's cache is kept in
# /tmp/mixkd-compile-cache, so step 3 reuses what step 2 compiled. Budget: about 10 s of set-up + the caps.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/mixkd-bench}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/mixkd-compile-cache
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "installing the carried wheels failed"; exit 1; }
  export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
python3 -c "import pydantic" 2>/dev/null || { echo "pydantic is missing: carry its wheels in .whl/ (see above)"; exit 1; }
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  echo "cores: $(nproc)"; git log -1 --format='commit %h' 2>/dev/null; date -u; } | tee "$OUT/gpu.txt"

# 1. correctness on the GPU
tests="tests/test_step.py tests/test_compile.py tests/test_pack.py::test_packed_runs_on_streams_match_alone_on_cuda"
tests="$tests tests/test_resume.py::test_stop_mid_epoch_and_resume_on_cuda_matches_within_tolerance"
timeout -k 5 110 python3 -m pytest -v -p no:cacheprovider $tests >"$OUT/tests.txt" 2>&1
echo "pytest exit status $?" >>"$OUT/tests.txt"

# 2. the benchmark (prints what it measured even when stopped by its cap)
PAIRS=resnet32x4:resnet8x4,resnet56:resnet20,wrn_40_2:wrn_16_2
timeout -k 10 220 python3 bench/step_bench.py --pairs $PAIRS --variants deghpq --pack 2,4,8 --steps 200 --warmup 20 \
  --json "$OUT/bench.json" >"$OUT/bench.txt" 2>"$OUT/bench.log"
echo "step_bench exit status $?" >>"$OUT/bench.log"

# 3. what else issue 12 asks to try
timeout -k 10 75 python3 bench/step_bench.py --pairs resnet32x4:resnet8x4 --variants gsm --steps 200 --warmup 20 \
  --json "$OUT/try.json" >"$OUT/try.txt" 2>"$OUT/try.log"
echo "step_bench (try) exit status $?" >>"$OUT/try.log"

echo; echo "== summary =="
cat "$OUT/gpu.txt"
echo "-- tests (tests.txt)"; grep -E "PASSED|FAILED|ERROR|SKIPPED|passed|failed|exit status" "$OUT/tests.txt" | tail -n 40
echo "-- also try (try.txt; its log ends: $(tail -n 1 "$OUT/try.log"))"; cat "$OUT/try.txt"
echo "-- benchmark (bench.txt; its log ends: $(tail -n 1 "$OUT/bench.log"))"; cat "$OUT/bench.txt"
