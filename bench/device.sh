#!/usr/bin/env bash
# Every GPU measurement of the speed issue, in one go (about 8 minutes on an H100/H200).
# Expects real CIFAR-100 in $DATA/cifar-100-python (default /tmp/data) and writes details to $OUT.
#   DATA=/tmp/data OUT=/tmp/out bash bench/device.sh
# The lent GPU machines' image has torch, torchvision, safetensors, PyYAML, tqdm, scikit-learn and
# matplotlib but not pydantic: carry wheels of pydantic, pydantic-core, annotated-types and
# typing-inspection (python 3.12, manylinux x86_64) in .whl/ and install them first (the device
# tool's README gives the pip download / pip install --target recipe).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-/tmp/data}
OUT=${OUT:-/tmp/mixkd-bench}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps -e . 2>/dev/null || pip install -q --no-deps -e .
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"

# 1. graphed == eager over 20 steps (fp32 and bf16)
python3 -m pytest -q tests/test_step.py 2>&1 | tail -3 | tee "$OUT/graph-test.txt"

# 2. step throughput, variants a-f, the five pairs (about 3 minutes)
python3 bench/step_bench.py --data-dir "$DATA" --steps 300 --json "$OUT/step_bench.json" 2>"$OUT/step_bench.log" \
  | tee "$OUT/step_bench.txt"

# 3. a 10-epoch resnet32x4 -> resnet8x4 distillation with per-epoch evaluation, projected to 240 epochs
python3 - <<'PY'
import torch
from mixkd.checkpoint import save_checkpoint
from mixkd.models import create_model
torch.manual_seed(0)
save_checkpoint("/tmp/teacher-resnet32x4.safetensors", create_model("resnet32x4", 100), model_name="resnet32x4",
                num_classes=100, epoch=0)
PY
rm -rf "$OUT/proj"
python3 -m mixkd distill --teacher /tmp/teacher-resnet32x4.safetensors --student resnet8x4 --kd std --mix mixup \
  --mix-fraction 0.1 --precision bf16 --epochs 10 --data-dir "$DATA" \
  --out /tmp/proj --no-progress >"$OUT/projection.log" 2>&1
python3 - "$OUT" <<'PY'
import json, sys
r = json.load(open("/tmp/proj/result.json"))
line = f"10 epochs resnet32x4 -> resnet8x4 (bf16, graph, eval each epoch): {r['wall_seconds']:.1f} s -> 240 epochs ~ {r['wall_seconds'] * 24 / 60:.1f} min"
print(line); open(sys.argv[1] + "/projection.txt", "w").write(line + "\n")
PY

# 4. real-data check: vanilla resnet8x4, 80 epochs, batch 64, schedule x0.1 at 62.5/75/87.5%, fp32 and bf16
#    run side by side (two runs on one GPU, which is also what the study runner's K-runs-per-GPU does)
rm -rf /tmp/r8x4-fp32 /tmp/r8x4-bf16
python3 -m mixkd train --model resnet8x4 --epochs 80 --data-dir "$DATA" --precision fp32 --out /tmp/r8x4-fp32 --no-progress \
  >"$OUT/r8x4-fp32.log" 2>&1 &
python3 -m mixkd train --model resnet8x4 --epochs 80 --data-dir "$DATA" --precision bf16 --out /tmp/r8x4-bf16 --no-progress \
  >"$OUT/r8x4-bf16.log" 2>&1 &
wait
cp /tmp/r8x4-fp32/result.json "$OUT/r8x4-fp32.json"; cp /tmp/r8x4-bf16/result.json "$OUT/r8x4-bf16.json"

echo; echo "== summary =="
cat "$OUT/gpu.txt" "$OUT/graph-test.txt" "$OUT/projection.txt"
for p in fp32 bf16; do python3 -c "import json;r=json.load(open('$OUT/r8x4-$p.json'));print(f\"resnet8x4 80 ep $p: top-1 {r['top1']:.2f}% (best {r['best_top1']:.2f}) in {r['wall_seconds']:.0f} s\")"; done
cat "$OUT/step_bench.txt"
