# Shared by bench/device.sh and bench/claims.sh (sourced, not run): set-up on a lent GPU machine, the
# header at the top of every output, and the rules of what comes back from $OUT (bench/GPU.md).
#
# The lent machines' image has torch 2.11, Triton, pytest, PyYAML, safetensors and tqdm but not pydantic:
# carry these wheels (python 3.12, manylinux x86_64) in .whl/; they are installed into /tmp/site:
WHEELS="pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2 typing-extensions==4.16.0"
# (typing-extensions travels too: issue 16 saw pydantic fail to import with the image's own; 4.16 is the one asked for.)
# Fetch them here, once, from the repository's root (the device tool's README gives the platforms):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl $WHEELS
#
# SMOKE=1 runs every step on the CPU with tiny sizes (no wheels, no GPU); the output rules are the same.
MAX_FILES=8                      # files back from $OUT per call
MAX_BYTES=$((15 * 1024 * 1024))  # per file (the limit is 16 MiB: 1 MiB kept in hand)
WINDOW=${WINDOW:-/tmp/mixkd-window}  # what one call leaves for the next on the same (warm) machine
SMOKE=${SMOKE:-0}

# window_setup NAME: wheels, PYTHONPATH (this checkout's mixkd, in subprocesses too), the import check;
# writes the header to $HEADER and prints it. Exits 2 with the real error when mixkd cannot import.
window_setup() {
  local name=$1 err
  mkdir -p "$OUT" "$WINDOW" || { echo "$name: cannot create $OUT or $WINDOW" >&2; exit 2; }
  export PYTHONUNBUFFERED=1
  HEADER="$WINDOW/header-$name.txt"
  if [ "$SMOKE" != 1 ] && compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      >"$WINDOW/pip.txt" 2>&1 || { echo "$name: installing the carried wheels failed: $(grep -m 1 -i error "$WINDOW/pip.txt")" >&2; exit 2; }
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  fi
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  {
    echo "== $name$([ "$SMOKE" = 1 ] && echo ' (SMOKE=1: tiny sizes on the CPU, the figures mean nothing)') =="
    echo "commit $(git describe --always --dirty 2>/dev/null || echo 'unknown (no .git)'), $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    if command -v nvidia-smi >/dev/null && [ "$SMOKE" != 1 ]; then
      echo "device $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -n 1)"
    else
      echo "device cpu ($(nproc) cores)"
    fi
    echo "carried wheels: $(ls .whl 2>/dev/null | tr '\n' ' ')(needed: $WHEELS)"
  } >"$HEADER"
  # one python for the versions and the import check (a torch import is seconds on 2 cores)
  err=$(python3 -c "
import sys, torch
print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available(), flush=True)
import pydantic, yaml, safetensors, mixkd.engine, mixkd.study" 2>&1)
  local ok=$?
  { head -n 3 "$HEADER"; echo "$err" | head -n 1; tail -n 1 "$HEADER"; } >"$HEADER.tmp" && mv "$HEADER.tmp" "$HEADER"
  if [ $ok != 0 ]; then
    echo "import failed: $(echo "$err" | tail -n 1)" >>"$HEADER"
    echo "  mixkd cannot import here: carry the wheels named above in .whl/ (bench/window.sh says how), one version of each" >>"$HEADER"
    cat "$HEADER" | tee "$OUT/setup-error.txt" >&2
    exit 2
  fi
  cat "$HEADER"
}

# with_header FILE: FILE starts with the header (called before a step writes to it).
with_header() { cat "$HEADER" >"$1"; }

# fit FILE: a text file over the per-file limit keeps its first 1 MiB and its last 12 MiB.
fit() {
  local f=$1
  [ -f "$f" ] && [ "$(stat -c %s "$f")" -gt "$MAX_BYTES" ] || return 0
  { head -c $((1024 * 1024)) "$f"; printf '\n[... cut to fit the 15 MiB limit ...]\n'; tail -c $((12 * 1024 * 1024)) "$f"; } >"$f.fit"
  mv "$f.fit" "$f"
}

# check_out: every file under $OUT comes back: at most $MAX_FILES, each at most 15 MiB, no deeper than
# $OUT/a/b/file, names of letters, digits, '.', '_' and '-'. Prints the listing; non-zero if a rule fails.
check_out() {
  local bad=0 n f size rel
  n=$(find "$OUT" -type f | wc -l)
  echo "-- files under \$OUT ($n of at most $MAX_FILES):"
  while IFS= read -r f; do
    size=$(stat -c %s "$f"); rel=${f#"$OUT"/}
    printf '  %10d  %s\n' "$size" "$rel"
    if [ "$size" -gt "$MAX_BYTES" ]; then echo "  RULE: $rel is over 15 MiB: it would not come back"; bad=1; fi
    if [ "$(echo "$rel" | tr -cd / | wc -c)" -gt 2 ]; then echo "  RULE: $rel is more than 2 folders down"; bad=1; fi
    if [[ ! "$rel" =~ ^[A-Za-z0-9._/-]+$ ]]; then echo "  RULE: $rel has characters that do not come back"; bad=1; fi
  done < <(find "$OUT" -type f | sort)
  if [ -n "$(find "$OUT" ! -type f ! -type d)" ]; then echo "  RULE: links or special files under \$OUT"; bad=1; fi
  if [ "$n" -gt "$MAX_FILES" ]; then echo "  RULE: $n files: only $MAX_FILES come back"; bad=1; fi
  [ $bad = 0 ] && echo "  output rules: OK" || echo "  output rules: BROKEN (see RULE lines)"
  return $bad
}
