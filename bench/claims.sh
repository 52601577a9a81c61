#!/usr/bin/env bash
# The study's claims on real CIFAR-100 in one GPU window (issue 11): join and check the data, run
# configs/studies/cifar100-mini.yaml (25 runs, resnet56 -> resnet20, bf16, packed 8 runs to a process)
# under `timeout` with --time-limit, so that the report and the archives are always written; the claims
# are printed last. bench/GPU.md: it is call 3 of the window plan.
#   PIECES="/tmp/mixkd-window/c100" OUT=/tmp/out bash bench/claims.sh   # pieces -> $DATA, then the study
#   DATA=/tmp/data OUT=/tmp/out bash bench/claims.sh                    # $DATA/cifar-100-python, or its .tar.gz
#   SMOKE=1 OUT=/tmp/out bash bench/claims.sh                           # every step on the CPU, tiny (CI runs it)
# Settings (environment): DATA (default $WINDOW/data: a folder holding cifar-100-python/ or
# cifar-100-python.tar.gz, or the .tar.gz itself), PIECES (pieces for bench/data.sh, joined into $DATA
# first), MINI (the study folder, default $WINDOW/mini: run again on the same machine, it resumes),
# LIMIT (the study's --time-limit, default 160s), CAP (its `timeout`, default LIMIT + 40 s), COMPILE
# (auto or off; default off when bench/device.sh's compile tests failed on this machine, else auto).
# A study folder whose runs were made with other settings (a start with compile on, retried with it off)
# is moved aside to MINI.old-<time> and the study starts in a fresh folder.
# What comes back ($OUT, at most 6 files, each under 15 MiB): study-run.log (header, data step, the study
# run and report), report.md, study-state.json, workers.log (the workers' own logs: tracebacks go there),
# study.tar.gz (the study folder without caches or checkpoints), checkpoints.tar.gz (only if it fits).
# Exit status: the study run's (0: every run finished; 75: stopped on time, resumable; 124: cut by CAP),
# 2 for a set-up or data error, 1 if an output rule failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/mixkd-claims}
. bench/window.sh
window_setup claims.sh
log=$OUT/study-run.log
with_header "$log"
STUDY=configs/studies/cifar100-mini.yaml
LIMIT=${LIMIT:-160s} REPORT_CAP=30
MINI=${MINI:-$WINDOW/mini}
if [ "$SMOKE" = 1 ]; then
  STUDY=bench/smoke-study.yaml LIMIT=${SMOKE_LIMIT:-150s} REPORT_CAP=180
  if [ -z "${DATA:-}" ]; then  # a tiny fake CIFAR-100, split in three pieces as the real one travels
    python3 -c "import sys; sys.path.insert(0, 'tests'); from pathlib import Path; from cifar_fixture import write_fake_cifar; write_fake_cifar(Path(sys.argv[1]), 100, n_train=192, n_test=100)" \
      "$WINDOW/smoke-src" || { echo "claims.sh: cannot make the fake CIFAR-100" >&2; exit 2; }
    PIECE_BYTES=400000 bash bench/data.sh split "$WINDOW/smoke-src" "$WINDOW/c100a" "$WINDOW/c100b" "$WINDOW/c100c" >>"$log" \
      || exit 2
    PIECES="$WINDOW/c100a $WINDOW/c100b $WINDOW/c100c" DATA=$WINDOW/data
  fi
fi
DATA=${DATA:-$WINDOW/data}
CAP=${CAP:-$(( $(python3 -c "from mixkd.control import parse_duration; print(int(parse_duration('$LIMIT')))") + 40 ))}

# The data: pieces joined and checked, or an archive checked, or a folder as it is.
if [ -n "${PIECES:-}" ]; then
  # shellcheck disable=SC2086  # PIECES is a list
  bash bench/data.sh "$DATA" $PIECES 2>&1 | tee -a "$log"; [ "${PIPESTATUS[0]}" = 0 ] || exit 2
elif [ -f "$DATA" ] && [[ "$DATA" == *.tar.gz ]]; then
  bash bench/data.sh "$(dirname "$DATA")" "$DATA" 2>&1 | tee -a "$log"; [ "${PIPESTATUS[0]}" = 0 ] || exit 2
  DATA=$(dirname "$DATA")
elif [ ! -d "$DATA/cifar-100-python" ] && [ -f "$DATA/cifar-100-python.tar.gz" ]; then
  bash bench/data.sh "$DATA" "$DATA/cifar-100-python.tar.gz" 2>&1 | tee -a "$log"; [ "${PIPESTATUS[0]}" = 0 ] || exit 2
fi
if [ ! -d "$DATA/cifar-100-python" ]; then
  echo "claims.sh: no CIFAR-100 in $DATA (neither cifar-100-python/ nor cifar-100-python.tar.gz): set DATA or PIECES" | tee -a "$log" >&2
  exit 2
fi

# compile: off when this machine's CUDA compile tests failed (bench/device.sh tests), unless COMPILE says
sets=(--set data_dir="$DATA")
compile_tests=$(cat "$WINDOW/compile-tests" 2>/dev/null || echo "not run on this machine")
COMPILE=${COMPILE:-$([[ "$compile_tests" == failed* ]] && echo off || echo auto)}
[ "$COMPILE" = auto ] || sets+=(--set compile="$COMPILE")
echo "compile=$COMPILE (the CUDA compile tests: $compile_tests)" | tee -a "$log"

# A folder holding runs made with other settings is moved aside: the study starts afresh.
plan=$([ -d "$MINI" ] && python3 -m mixkd study plan "$STUDY" --out "$MINI" "${sets[@]}" --pack 8 2>&1)
if [[ "$plan" == *"made with other settings"* ]]; then
  old=$MINI.old-$(date +%s)
  mv "$MINI" "$old"
  echo "$MINI held runs made with other settings (an earlier start?): moved to $old; starting in a fresh folder" | tee -a "$log"
fi

cmd=(python3 -m mixkd study run "$STUDY" --out "$MINI" "${sets[@]}" --pack 8 --time-limit "$LIMIT" --no-progress --no-report)
echo "command: timeout -k 15 $CAP ${cmd[*]}" | tee -a "$log"
start=$(date +%s)
timeout -k 15 "$CAP" "${cmd[@]}" >>"$log" 2>&1
rc=$?
echo "study run: exit $rc after $(( $(date +%s) - start )) s" | tee -a "$log"
case $rc in
  0) ;;
  75) echo "stopped on time: the folder is resumable (run this script again; a fresh machine needs study.tar.gz and checkpoints.tar.gz unpacked into $(dirname "$MINI"))" | tee -a "$log" ;;
  124|137) echo "cut by its cap of $CAP s: the folder holds the last checkpoints written" | tee -a "$log" ;;
  *) echo "claims.sh: the study run failed (exit $rc); reporting and packing what there is" | tee -a "$log" >&2 ;;
esac

timeout -k 5 "$REPORT_CAP" python3 -m mixkd study report "$MINI" >>"$log" 2>&1 || echo "study report: exit $?" | tee -a "$log"
for f in report.md study-state.json; do
  [ -f "$MINI/$f" ] && cp "$MINI/$f" "$OUT/"
done
if compgen -G "$MINI/logs/*.log" >/dev/null; then
  { cat "$HEADER"; for f in "$MINI"/logs/*.log; do echo "== $(basename "$f")"; cat "$f"; done; } >"$OUT/workers.log"
  fit "$OUT/workers.log"
fi

# The study folder without caches and checkpoints; the checkpoints in their own archive if it fits.
caches=(--exclude=.compile-cache --exclude=__pycache__ --exclude='*.tmp' --exclude='.study*.lock')
parent=$(dirname "$MINI") base=$(basename "$MINI")
if [ -d "$MINI" ]; then
  tar -czf "$OUT/study.tar.gz" "${caches[@]}" --exclude='*.safetensors' -C "$parent" "$base"
  if [ "$(stat -c %s "$OUT/study.tar.gz")" -gt "$MAX_BYTES" ]; then  # figures and event files out, text stays
    tar -czf "$OUT/study.tar.gz" "${caches[@]}" --exclude='*.safetensors' --exclude='*.png' --exclude='events.out.*' \
      -C "$parent" "$base"
    echo "study.tar.gz: over 15 MiB with figures and event files; packed without them" | tee -a "$log"
  fi
  (cd "$parent" && find "$base" -name '*.safetensors' -not -path '*/.compile-cache/*' | sort) >"$WINDOW/checkpoints.list"
  if [ -s "$WINDOW/checkpoints.list" ]; then
    tar -czf "$OUT/checkpoints.tar.gz" -C "$parent" -T "$WINDOW/checkpoints.list"
    size=$(stat -c %s "$OUT/checkpoints.tar.gz")
    if [ "$size" -gt "$MAX_BYTES" ]; then
      rm "$OUT/checkpoints.tar.gz"
      echo "checkpoints: $(wc -l <"$WINDOW/checkpoints.list") files, $((size / 1048576)) MiB packed: over 15 MiB, not brought back (they stay in $MINI while the machine is held)" | tee -a "$log"
    else
      echo "checkpoints.tar.gz: $(wc -l <"$WINDOW/checkpoints.list") files, $((size / 1048576)) MiB" | tee -a "$log"
    fi
  fi
fi
fit "$log"

# The accuracy table, then the claims, last.
if [ -f "$MINI/report.md" ]; then
  echo
  awk '/^## Teacher → student/{p=1} /^## /&&!/^## Teacher → student/{p=0} p' "$MINI/report.md"
  awk '/^## Claims/{p=1; print; next} /^## /{p=0} p' "$MINI/report.md"
fi
check_out || { [ $rc = 0 ] && rc=1; }
exit $rc
