#!/usr/bin/env bash
# CIFAR-100 for a GPU window: join the pieces, check them, extract; one clear line and exit 2 on failure.
#   bash bench/data.sh DEST SOURCE...     -> DEST/cifar-100-python/{train,test,meta}
#   bash bench/data.sh split SRC OUTDIR... -> SRC (a folder holding cifar-100-python/) as a .tar.gz in
#                                            pieces of at most 58 MiB, one per OUTDIR, and its MD5 beside
#                                            the first piece (cifar-100-python.tar.gz.md5)
# SOURCE: cifar-100-python.tar.gz itself, or its pieces: files, or folders whose files are taken in name
# order, joined in the order given (a folder's *.md5 file is the expected MD5, not a piece).
# The joined archive is accepted when its MD5 is
#   - eb9058c3a382ffc7106e4002c42a8d85, the official cifar-100-python.tar.gz, or
#   - the one written by `data.sh split` beside the pieces (the archive split here),
# else its extracted files must be the lossless copy of ../shared/data (SHA-256 in its README.md;
# ../shared/tools/cifar100-chunks splits that copy without writing an MD5).
# DEST/cifar-100-python is replaced only by a checked folder (extracted beside it first); an existing
# DEST/cifar-100-python is left as it is when no SOURCE is given.
set -uo pipefail
OFFICIAL_MD5=eb9058c3a382ffc7106e4002c42a8d85
# ../shared/data/cifar-100-python: train, test, meta (SHA-256; the test split is a fixed shuffle of the official)
SHARED_SHA256="1c4ab7ad86a90012e5b8d95f29daefdc77de323b151867b342b16c699e65d9dd a651843721b072884bf8f4c8071027c624802d52c55f19480dae39b778c23601 b517edc30ce2ba8e38c12b18a15e29ce66f2c7c4dbadbcdcb6c5b0e213617d07"
PIECE=${PIECE_BYTES:-$((58 * 1024 * 1024))}  # smaller only to test the joining

joined=""  # the archive joined here: removed again if it is refused (mixkd would try to extract it)
die() { echo "data.sh: $*" >&2; [ -n "$joined" ] && rm -f "$joined"; exit 2; }

if [ "${1:-}" = split ]; then
  [ $# -ge 3 ] || die "usage: bash bench/data.sh split SRC OUTDIR..."
  src=$2; shift 2
  [ -d "$src/cifar-100-python" ] || die "no $src/cifar-100-python to split; pass the folder that holds it"
  tmp=$(mktemp -d) || die "cannot make a temporary folder"
  tar -czf "$tmp/a.tar.gz" -C "$src" cifar-100-python || die "cannot pack $src/cifar-100-python"
  md5=$(md5sum "$tmp/a.tar.gz" | cut -d' ' -f1)
  (cd "$tmp" && split -b $PIECE -d a.tar.gz part) || die "cannot split the archive"
  rm "$tmp/a.tar.gz"
  pieces=("$tmp"/part*)
  [ ${#pieces[@]} -le $# ] || die "the archive needs ${#pieces[@]} pieces of $PIECE bytes; give as many OUTDIRs"
  i=0
  for d in "$@"; do
    mkdir -p "$d" && rm -f "$d"/part* "$d"/*.md5 || die "cannot write $d"
    [ $i -lt ${#pieces[@]} ] && mv "${pieces[$i]}" "$d/"
    i=$((i + 1))
  done
  echo "$md5  cifar-100-python.tar.gz" >"$1/cifar-100-python.tar.gz.md5"
  rmdir "$tmp"
  echo "data.sh: cifar-100-python.tar.gz (MD5 $md5) in ${#pieces[@]} piece(s) in $*"
  exit 0
fi

[ $# -ge 1 ] || die "usage: bash bench/data.sh DEST [SOURCE...] (see the top of bench/data.sh)"
dest=$1; shift
mkdir -p "$dest" || die "cannot create $dest"
if [ $# -eq 0 ]; then
  [ -f "$dest/cifar-100-python/train" ] && { echo "data.sh: $dest/cifar-100-python is there (nothing to join)"; exit 0; }
  die "no CIFAR-100 in $dest and no SOURCE given: pass the pieces (.c100a .c100b .c100c) or cifar-100-python.tar.gz"
fi

# The pieces, in order; an expected MD5 from a folder's .md5 file.
pieces=() expected=""
for s in "$@"; do
  if [ -d "$s" ]; then
    for f in "$s"/*; do
      [ -f "$f" ] || continue
      case $f in *.md5) expected=$(cut -d' ' -f1 "$f") ;; *) pieces+=("$f") ;; esac
    done
  elif [ -f "$s" ]; then
    pieces+=("$s")
    [ -f "$s.md5" ] && expected=$(cut -d' ' -f1 "$s.md5")
  else
    die "piece $s is missing (each call of the window plan copies its piece to the same folder; was the machine given back between calls?)"
  fi
done
[ ${#pieces[@]} -gt 0 ] || die "no pieces found in $*"

archive="$dest/cifar-100-python.tar.gz"
if [ ${#pieces[@]} -eq 1 ] && [ "$(realpath "${pieces[0]}")" = "$(realpath -m "$archive")" ]; then
  :  # the archive itself, already in place
else
  joined=$archive
  cat "${pieces[@]}" >"$archive.tmp" && mv "$archive.tmp" "$archive" || die "cannot write $archive"
fi
md5=$(md5sum "$archive" | cut -d' ' -f1)
how=""
if [ "$md5" = "$OFFICIAL_MD5" ]; then
  how="the official archive (MD5 $md5)"
elif [ -n "$expected" ] && [ "$md5" = "$expected" ]; then
  how="the archive split by data.sh (MD5 $md5)"
elif [ -n "$expected" ]; then
  die "$archive has MD5 $md5, not the $expected written beside the pieces: a piece is missing, damaged or out of order (joined: ${pieces[*]})"
fi

tmp=$(mktemp -d "$dest/.extract-XXXXXX") || die "cannot extract into $dest (not writable?)"
trap 'rm -rf "$tmp"' EXIT
tar -xzf "$archive" -C "$tmp" 2>"$tmp/tar.err" \
  || die "cannot extract $archive (MD5 $md5): $(grep -m 1 . "$tmp/tar.err"); a piece is missing, damaged or out of order (joined: ${pieces[*]})"
for f in train test meta; do
  [ -f "$tmp/cifar-100-python/$f" ] || die "$archive holds no cifar-100-python/$f: not CIFAR-100 in the python layout"
done
if [ -z "$how" ]; then
  sums=$(cd "$tmp/cifar-100-python" && sha256sum train test meta | cut -d' ' -f1 | tr '\n' ' ')
  [ "${sums% }" = "$SHARED_SHA256" ] \
    || die "$archive (MD5 $md5) is neither the official archive (MD5 $OFFICIAL_MD5) nor the lossless copy of ../shared/data (SHA-256 of train, test, meta differ): a piece is missing, damaged or out of order (joined: ${pieces[*]})"
  how="the lossless copy of ../shared/data (SHA-256 of train, test, meta checked)"
fi
joined=""
rm -rf "$dest/cifar-100-python"
mv "$tmp/cifar-100-python" "$dest/" || die "cannot move the extracted folder into $dest"
echo "data.sh: $dest/cifar-100-python from $how, ${#pieces[@]} piece(s)"
