#!/usr/bin/env bash
# The GPU work of issues 9 (packed runs) and 12 (compiled step), in steps that fit the calls of one GPU
# window (bench/GPU.md gives the window plan: which call runs which step, and its device time):
#   OUT=/tmp/out bash bench/device.sh tests    # call 1, at most 140 s: the CUDA correctness tests
#   OUT=/tmp/out bash bench/device.sh bench    # call 2, at most 160 s: the benchmark
#   OUT=/tmp/out bash bench/device.sh try      # not in the window plan (does not fit): max-autotune, 75 s
#   OUT=/tmp/out bash bench/device.sh methods  # not in the window plan: the KD methods' CUDA tests, 130 s
#   OUT=/tmp/out bash bench/device.sh data     # not in the window plan: image-folder data rates, 90 s
#   OUT=/tmp/out bash bench/device.sh ddp      # call 1 after tests, at most 60 s: one run in 2 processes on the GPU
#   OUT=/tmp/out bash bench/device.sh          # tests, bench, try, ddp in one call (~8 min)
#   SMOKE=1 OUT=/tmp/out bash bench/device.sh  # every step on the CPU with tiny sizes (CI runs this)
# Set-up (wheels, header, output rules): bench/window.sh. Every step runs under `timeout` and writes what
# it measured even when its cap stops it; the header (commit, device, torch, wheels) tops every text file;
# at most 8 files come back (this script writes at most 8), each checked to be under 15 MiB.
#
# tests (tests.txt; caps 70 s + 60 s): the CUDA tests, compile last so that its failure costs nothing else:
#   loaders (tests/test_data.py, device=cuda), packs (three different runs packed on streams == alone;
#   Pack.measure on streams leaves every run as it was), step-exact resume (fp32, bf16), graphs (graphed ==
#   eager over 20 steps; TrainStep.measure leaves a graphed run as it was); then compile (the compiled
#   graphed step == the uncompiled one over 20 steps: fp32, bf16, bf16 with mixing and losses compiled).
#   The compile tests' outcome is left in $WINDOW/compile-tests: bench/claims.sh runs the study with
#   compile=off when it says "failed".
# bench (bench.txt/.json, cap 70 s; compiled.txt/.json, cap 80 s): bench/step_bench.py, bf16 +
#   channels-last, PMU 10% + standardized KD, batch 64, 100 steps after 10, random CIFAR-shaped images:
#   1. uncompiled, resnet32x4 -> resnet8x4, resnet56 -> resnet20, wrn_40_2 -> wrn_16_2: d (one run, CUDA
#      graph), e (batch 512, the ceiling), p (K = 2, 4, 8 runs in one mixkd.pack.Pack, each on its own
#      stream) and the mixed pack (one run of each pair): all of issue 9's targets;
#   2. compiled, resnet32x4 -> resnet8x4: g / h (d / e compiled), q (K = 8 compiled runs), the warm-up of
#      1 and 8 compiled runs from an empty dynamo cache, s (mixing and losses compiled too): issue 12's
#      targets for that pair and its "also try" s.
# try (try.txt/.json, cap 75 s): m (inductor's max-autotune-no-cudagraphs) beside g.
# methods (methods.txt, cap 40 s + 90 s): DKD, LS-KD, DIST and FitNet, graphed == eager over 20 steps (fp32, bf16)
#   and 3 steps under torch.cuda.set_sync_debug_mode("error") (no host synchronization in their losses); then
#   mdistiller's catalogue, CTKD and MLKD (tests/test_catalogue_methods.py: the same two checks, fp32; CRD, whose
#   negatives come from torch's generator, is checked captured with finite losses and its memory written).
# data (data.txt/.json, cap 90 s): bench/data_bench.py on generated ImageNet-sized JPEGs: decoded-and-augmented
#   images/s per DataLoader worker count (0, 1, 2, 4, 8, 16) on the machine's CPU, then
#   torchvision.io.decode_jpeg(device='cuda') batches of 64 and 256 (+ RandomResizedCrop 224 + flip on the GPU).
# ddp (ddp.txt, cap 60 s): torchrun --nproc-per-node 2 on the one GPU (both ranks on cuda:0, so the backend
#   is gloo: NCCL refuses two ranks on one GPU), --sync-bn, fp32, graph and compile left on (a data-parallel step
#   is eager: its log says so), against the 1-process run of the same config, eager (--no-graph --compile off):
#   digits, resnet8, batch 64 (2 x 32), 2 epochs of 22 steps;
#   bench/ddp_check.py compares the losses epoch by epoch (rtol 1e-3: cuDNN picks its kernels per batch size)
#   and prints each run's images/s (2 processes on one GPU show the cost of DDP's all-reduce, not a speed-up);
#   then the 2-process run's result.json against `mixkd eval` of its checkpoint on the GPU (the saved model's
#   figures: identical, or top-1/top-5 equal and the NLL within 1e-5).
# inductor's cache is kept in $WINDOW/compile-cache, so later steps and calls reuse what was compiled.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/mixkd-bench}
. bench/window.sh
steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(tests bench try ddp)
for s in "${steps[@]}"; do
  case $s in tests|bench|try|methods|data|ddp) ;; *) echo "device.sh: unknown step '$s'; choose from tests, bench, try, methods, data, ddp" >&2; exit 2 ;; esac
done
window_setup device.sh
export TORCHINDUCTOR_CACHE_DIR=$WINDOW/compile-cache
PAIRS=resnet32x4:resnet8x4,resnet56:resnet20,wrn_40_2:wrn_16_2
FIRST=resnet32x4:resnet8x4
SIZES=(--steps 100 --warmup 10)
CAP_TESTS=70 CAP_COMPILE=60 CAP_BENCH=70 CAP_COMPILED=80 CAP_TRY=75 CAP_METHODS=40 CAP_CATALOGUE=90 CAP_DATA=90 CAP_DDP=60
DATA_ARGS=(--workers 0,1,2,4,8,16)
DDP_DATA=(--dataset digits --epochs 2 --device cuda)
if [ "$SMOKE" = 1 ]; then  # the tiny pair twice (so that the mixed pack runs), CPU-sized caps
  PAIRS=tiny:tiny,tiny:tiny FIRST=tiny:tiny SIZES=(--small)
  CAP_TESTS=120 CAP_COMPILE=120 CAP_BENCH=240 CAP_COMPILED=240 CAP_TRY=240 CAP_DATA=120 CAP_DDP=240
  DATA_ARGS=(--small --workers 0,1)
  DDP_DATA=(--dataset cifar10 --data-dir "$WINDOW/ddp-data" --epochs 2 --device cpu)  # 64 fake images: 1 step an epoch
fi
rc=0

# capped SECONDS LOG CMD...: run CMD under timeout, append its exit status to LOG; returns it.
capped() {
  local cap=$1 log=$2 status; shift 2
  timeout -k 10 "$cap" "$@"
  status=$?
  [ $status = 124 ] || [ $status = 137 ] && echo "stopped by its cap of $cap s (exit $status)" >>"$log"
  echo "exit status $status" >>"$log"
  return $status
}

run_tests() {
  local t=$OUT/tests.txt status
  with_header "$t"
  local first=(tests/test_pack.py::test_packed_runs_on_streams_match_alone_on_cuda
               tests/test_pack.py::test_pack_measure_on_streams_leaves_every_run_as_it_was_on_cuda
               tests/test_resume.py::test_stop_mid_epoch_and_resume_on_cuda_matches_within_tolerance
               tests/test_step.py::test_graphed_and_eager_steps_give_the_same_losses_over_20_steps
               tests/test_compile.py::test_measure_leaves_a_graphed_run_as_it_was)
  echo "-- loaders, packs, resume, graphs (cap $CAP_TESTS s)" >>"$t"
  # the loaders' CUDA cases are parameters of tests/test_data.py: -k picks them (and keeps the others)
  capped "$CAP_TESTS" "$t" python3 -m pytest -q -rs -p no:cacheprovider -k "cuda or graphed" tests/test_data.py \
    "${first[@]}" >>"$t" 2>&1
  status=$?
  [ $status = 0 ] || rc=1
  echo "-- compile (cap $CAP_COMPILE s)" >>"$t"
  capped "$CAP_COMPILE" "$t" python3 -m pytest -q -rs -p no:cacheprovider \
    tests/test_compile.py::test_compiled_graphed_step_matches_uncompiled_over_20_steps >>"$t" 2>&1
  status=$?
  if [ $status = 0 ] && grep -q " passed" <(tail -n 5 "$t"); then
    echo passed >"$WINDOW/compile-tests"
  elif [ $status = 0 ]; then
    echo "skipped (no CUDA)" >"$WINDOW/compile-tests"
  else
    echo "failed (pytest exit $status)" >"$WINDOW/compile-tests"; rc=1
  fi
  echo "compile tests: $(cat "$WINDOW/compile-tests") (bench/claims.sh reads this: compile=off if failed)" >>"$t"
  fit "$t"
}

# bench_step NAME CAP ARGS...: bench/step_bench.py into NAME.txt (progress, then the tables) and NAME.json
bench_step() {
  local name=$1 cap=$2; shift 2
  with_header "$OUT/$name.txt"
  echo "command: python3 bench/step_bench.py $* ${SIZES[*]} (cap $cap s)" >>"$OUT/$name.txt"
  capped "$cap" "$OUT/$name.txt" python3 bench/step_bench.py "$@" "${SIZES[@]}" --json "$OUT/$name.json" \
    >>"$OUT/$name.txt" 2>&1 || rc=1
  fit "$OUT/$name.txt"
}

# run_ddp: one run in 2 processes (torchrun, one GPU) against the same run in one process: ddp.txt
run_ddp() {
  local t=$OUT/ddp.txt dir=$WINDOW/ddp status
  with_header "$t"
  rm -rf "$dir" && mkdir -p "$dir"
  if [ "$SMOKE" = 1 ]; then
    python3 -c "import sys; sys.path.insert(0, 'tests'); from pathlib import Path; from cifar_fixture import write_fake_cifar
write_fake_cifar(Path(sys.argv[1]), num_classes=10, n_train=64, n_test=40, seed=0)" "$WINDOW/ddp-data" >>"$t" 2>&1
  fi
  # the 2-process run keeps the defaults (graph, compile auto): under DDP it says in its log that it runs eagerly
  local args=(train "${DDP_DATA[@]}" --model resnet8 --batch-size 64 --precision fp32 --sync-bn --no-progress
              --save-every 1000)
  echo "-- 1 process: python3 -m mixkd ${args[*]} --no-graph --compile off --out $dir/one (cap $CAP_DDP s for both runs)" >>"$t"
  local start=$SECONDS
  capped "$CAP_DDP" "$t" python3 -m mixkd "${args[@]}" --no-graph --compile off --out "$dir/one" >>"$t" 2>&1 || rc=1
  echo "-- 2 processes: python3 -m torch.distributed.run --standalone --nproc-per-node 2 -m mixkd ${args[*]} --out $dir/two" >>"$t"
  capped $((CAP_DDP - (SECONDS - start) > 5 ? CAP_DDP - (SECONDS - start) : 5)) "$t" \
    python3 -m torch.distributed.run --standalone --nproc-per-node 2 -m mixkd "${args[@]}" --out "$dir/two" >>"$t" 2>&1
  status=$?
  [ $status = 0 ] || rc=1
  grep -h "x 2 processes\|under DDP" "$dir/two/log.txt" >>"$t" 2>/dev/null
  echo "-- python3 -m mixkd eval $dir/two --json" >>"$t"
  python3 -m mixkd eval "$dir/two" --json >"$dir/eval.json" 2>>"$t" || rc=1
  python3 bench/ddp_check.py "$dir/one" "$dir/two" --rtol 1e-3 --eval "$dir/eval.json" >>"$t" 2>&1 || rc=1
  fit "$t"
}

for s in "${steps[@]}"; do
  case $s in
    tests) run_tests ;;
    ddp) run_ddp ;;
    bench) bench_step bench "$CAP_BENCH" --pairs "$PAIRS" --variants dep --pack 2,4,8
           bench_step compiled "$CAP_COMPILED" --pairs "$FIRST" --variants ghqs --pack 8 ;;
    try) bench_step try "$CAP_TRY" --pairs "$FIRST" --variants gm ;;
    methods) with_header "$OUT/methods.txt"
             capped "$CAP_METHODS" "$OUT/methods.txt" python3 -m pytest -q -rs -p no:cacheprovider \
               tests/test_kd_methods.py::test_graphed_step_equals_eager_for_each_method_on_cuda \
               tests/test_kd_methods.py::test_each_method_steps_without_host_sync_on_cuda >>"$OUT/methods.txt" 2>&1 \
               || rc=1
             capped "$CAP_CATALOGUE" "$OUT/methods.txt" python3 -m pytest -q -rs -p no:cacheprovider \
               tests/test_catalogue_methods.py::test_each_catalogue_method_is_captured_by_the_cuda_graph \
               tests/test_catalogue_methods.py::test_each_catalogue_method_steps_without_host_sync_on_cuda \
               >>"$OUT/methods.txt" 2>&1 || rc=1
             fit "$OUT/methods.txt" ;;
    data) with_header "$OUT/data.txt"
          echo "command: python3 bench/data_bench.py ${DATA_ARGS[*]} (cap $CAP_DATA s)" >>"$OUT/data.txt"
          capped "$CAP_DATA" "$OUT/data.txt" python3 bench/data_bench.py "${DATA_ARGS[@]}" --json "$OUT/data.json" \
            >>"$OUT/data.txt" 2>&1 || rc=1
          fit "$OUT/data.txt" ;;
  esac
done

echo; echo "== summary =="
cat "$HEADER"
if [ -f "$OUT/tests.txt" ]; then
  echo "-- tests (tests.txt)"; grep -E "passed|failed|error|skipped|SKIPPED|FAILED|ERROR|exit status|cap of|compile tests" "$OUT/tests.txt" | tail -n 30
fi
if [ -f "$OUT/data.txt" ]; then
  echo "-- data (data.txt, data.json; $(tail -n 1 "$OUT/data.txt"))"; awk '/^\| /' "$OUT/data.txt"
fi
if [ -f "$OUT/ddp.txt" ]; then
  echo "-- ddp (ddp.txt)"; grep -E "^epoch|^images/s|^ddp check|exit status|cap of" "$OUT/ddp.txt" | tail -n 12
fi
for name in try compiled bench; do
  [ -f "$OUT/$name.txt" ] || continue
  echo "-- $name ($name.txt, $name.json; $(tail -n 1 "$OUT/$name.txt"))"
  awk '/^distillation step/{p=1} /^exit status/{p=0} p' "$OUT/$name.txt"
done
check_out || rc=1
exit $rc
