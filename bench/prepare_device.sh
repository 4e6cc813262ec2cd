#!/usr/bin/env bash
# Prepare the folder that bench/gpu_check.sh needs on a GPU machine that cannot download, on a machine that can:
#
#   bash bench/prepare_device.sh --mnist-root DIR     # DIR holds MNIST/raw/{train,t10k}-*-ubyte[.gz]
#
# It fills .gpu_check/ (ignored by git) in the repository root:
#   wheels/   hydra-core, omegaconf, antlr4 (built from its sdist), diffusers, torch-fidelity:
#             pure-Python wheels for the GPU machine's Python (3.12; --python-version to change)
#   data/MNIST/raw/   the four MNIST IDX files, gzipped (about 11 MiB)
#   COMMIT    the commit the check will measure (rewritten on every call: run this again after committing)
# Already present wheels and data are kept, so a second call only refreshes COMMIT. The whole folder is about
# 20 MiB; carry it to the GPU machine with the working tree and run `bash bench/gpu_check.sh` there.
set -euo pipefail
cd "$(dirname "$0")/.."

mnist_root="" python_version=3.12
while [ $# -gt 0 ]; do
  case "$1" in
    --mnist-root) mnist_root="$2"; shift 2 ;;
    --python-version) python_version="$2"; shift 2 ;;
    -h|--help) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; exit 0 ;;
    *) echo "prepare_device.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

dest=.gpu_check
mkdir -p "$dest/wheels" "$dest/data/MNIST/raw"

# The packages the GPU machine's image lacks (it has torch, lightning, torchmetrics, torchvision, rich, pytest), at
# the versions the test suite runs with. diffusers lists importlib_metadata but imports it only on Python < 3.8.
wheels="hydra-core==1.3.8 omegaconf==2.3.1 antlr4-python3-runtime==4.9.3 diffusers==0.42.1 torch-fidelity==0.4.0"
if [ "$(cat "$dest/wheels/REQUIREMENTS" 2>/dev/null)" != "$wheels $python_version" ]; then
  rm -rf "$dest/wheels" && mkdir -p "$dest/wheels"  # one version of each: two would stop the install there
  # shellcheck disable=SC2086
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$python_version" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$dest/wheels" ${wheels/antlr4-python3-runtime==4.9.3/}
  python3 -m pip wheel -q --no-deps -w "$dest/wheels" antlr4-python3-runtime==4.9.3  # an sdist only: build it
  echo "$wheels $python_version" > "$dest/wheels/REQUIREMENTS"
fi

if [ -n "$mnist_root" ]; then
  raw="$mnist_root/MNIST/raw"
  for name in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
    if [ -f "$raw/$name.gz" ]; then
      cp "$raw/$name.gz" "$dest/data/MNIST/raw/$name.gz"
    elif [ -f "$raw/$name" ]; then
      gzip -c "$raw/$name" > "$dest/data/MNIST/raw/$name.gz"
    else
      echo "prepare_device.sh: $raw/$name(.gz) not found; --mnist-root must hold MNIST/raw/ as torchvision" \
           "writes it (python -c \"import torchvision; torchvision.datasets.MNIST('DIR', download=True)\")" >&2
      exit 2
    fi
  done
elif ! ls "$dest"/data/MNIST/raw/*.gz >/dev/null 2>&1; then
  echo "prepare_device.sh: no MNIST copy in $dest/data yet: pass --mnist-root DIR (DIR/MNIST/raw/*-ubyte)" >&2
  exit 2
fi

commit=$(git rev-parse HEAD)
if ! git diff --quiet HEAD --; then commit="$commit-dirty"; fi
echo "$commit" > "$dest/COMMIT"

if ! git check-ignore -q "$dest"; then
  echo "prepare_device.sh: $dest is not ignored by git; add '/$dest/' to .gitignore" >&2
  exit 2
fi
echo "prepared $dest ($(du -sh "$dest" | cut -f1)) for commit $commit:"
ls "$dest/wheels" "$dest/data/MNIST/raw"
echo "next: the device tool's run with command 'bash bench/gpu_check.sh', carry [\"$dest\"], timeout_s 570"
