#!/usr/bin/env bash
# The study's claims on real CIFAR-100 in one GPU window (issue 11): run configs/studies/cifar100-mini.yaml
# (25 runs, resnet56 -> resnet20, bf16) packed 8 runs to a process, stopping on time after 8 minutes if it
# must, write the report, pack the study folder into one archive under $OUT and print the claims last.
#   DATA=/tmp/data OUT=/tmp/out bash bench/claims.sh
# Expects real CIFAR-100 in $DATA/cifar-100-python. Running it again on the same machine resumes the study
# folder ($MINI, default /tmp/mini). Exit status: the study run's (0: every run finished; 75: stopped on time,
# resumable), or its error.
# The lent GPU machines' image lacks pydantic (see bench/device.sh): carry wheels of pydantic,
# pydantic-core, annotated-types and typing-inspection (python 3.12, manylinux x86_64) in .whl/; they are
# installed into /tmp/site when pydantic is missing.
set -uo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-/tmp/data}
OUT=${OUT:-/tmp/mixkd-claims}
MINI=${MINI:-/tmp/mini}
STUDY=configs/studies/cifar100-mini.yaml
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ ! -d "$DATA/cifar-100-python" ]; then
  echo "claims.sh: no CIFAR-100 in $DATA/cifar-100-python (set DATA)" >&2; exit 2
fi
if ! python3 -c "import pydantic" 2>/dev/null; then
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "claims.sh: pydantic is missing and .whl/ holds no wheels (see bench/device.sh)" >&2; exit 2
  fi
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 2
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}   # this checkout's mixkd, in the workers too (no install needed)

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  echo "mixkd $(git describe --always --dirty 2>/dev/null || echo 'commit unknown (no .git)')"
  echo "date $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "command: python3 -m mixkd study run $STUDY --out $MINI --set data_dir=$DATA --pack 8 --time-limit 8m --no-progress"
} 2>&1 | tee "$OUT/gpu.txt"

start=$(date +%s)
python3 -m mixkd study run "$STUDY" --out "$MINI" --set data_dir="$DATA" --pack 8 --time-limit 8m --no-progress \
  2>&1 | tee "$OUT/study-run.log"
rc=${PIPESTATUS[0]}
echo "study run: exit $rc after $(( $(date +%s) - start )) s" | tee -a "$OUT/gpu.txt"
case $rc in
  0) ;;
  75) echo "stopped on time: the folder is resumable (run this script again)" ;;
  *) echo "claims.sh: the study run failed (exit $rc); reporting and packing what there is" >&2 ;;
esac

if python3 -m mixkd study report "$MINI" 2>&1 | tee -a "$OUT/study-run.log"; then
  cp "$MINI/report.md" "$MINI/results.csv" "$MINI/claims.json" "$OUT/" 2>/dev/null
fi

# One archive of the study folder (finished runs keep small checkpoints); over ~60 MiB, without checkpoints.
archive="$OUT/cifar100-mini-study.tar.gz"
excludes=(--exclude='*.tmp' --exclude='.study.lock')
tar -czf "$archive" "${excludes[@]}" -C "$(dirname "$MINI")" "$(basename "$MINI")"
if [ "$(stat -c %s "$archive")" -gt $((60 * 1024 * 1024)) ]; then
  echo "archive over 60 MiB: packing the folder again without checkpoint files"
  tar -czf "$archive" "${excludes[@]}" --exclude='*.safetensors' -C "$(dirname "$MINI")" "$(basename "$MINI")"
fi
echo "archive: $archive ($(du -h "$archive" | cut -f1)); files under $OUT: $(ls "$OUT" | wc -l)"

# The accuracy table, then the claims, last.
if [ -f "$MINI/report.md" ]; then
  echo
  awk '/^## Teacher → student/{p=1} /^## /&&!/^## Teacher → student/{p=0} p' "$MINI/report.md"
  awk '/^## Claims/{p=1; print; next} /^## /{p=0} p' "$MINI/report.md"
fi
exit $rc
