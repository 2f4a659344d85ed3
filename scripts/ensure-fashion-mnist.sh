#!/usr/bin/env bash
# Makes sure Fashion-MNIST is on disk: uses the files if present, installs Debian's
# dataset-fashion-mnist when apt-get can run, and otherwise says exactly what to put where.
set -u
dir="${1:-/usr/share/datasets/fashion-mnist}"
files="train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz"
have_all() { for f in $files; do [ -s "$1/$f" ] || return 1; done; return 0; }

for d in "${CONVDESCENT_DATA:+$CONVDESCENT_DATA/fashion-mnist}" "$dir"; do
  [ -n "$d" ] && have_all "$d" && exit 0
done
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "Fashion-MNIST is missing: installing Debian's dataset-fashion-mnist ..."
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) >/dev/null
  have_all /usr/share/datasets/fashion-mnist && exit 0
fi
cat >&2 <<MSG
Fashion-MNIST was not found and could not be installed.
Put these four files (gzip-compressed IDX, as published) in $dir
or in \$CONVDESCENT_DATA/fashion-mnist:
  $(echo $files | sed 's/ /\n  /g')
or install Debian's package as root: apt-get install dataset-fashion-mnist
MSG
exit 1
