#!/usr/bin/env bash
# Prepares, on a machine with internet access, what the GPU suite needs on an offline GPU machine
# whose image has Python 3.12, torch + CUDA, triton, jax + CUDA, flax, optax, orbax, torchvision:
#
#   benchmarks/gpu_wheels.sh MNIST_DIR [OUT]      # OUT defaults to .gpu (git-ignored)
#
# OUT/wheels: jaxce built from this checkout, tokamax, liger-kernel, cut-cross-entropy and the
# dependencies of those and of train.py that such an image lacks, as Python 3.12 manylinux x86_64
# wheels, each downloaded with --no-deps (so no other torch, jax or CUDA library comes along).
# OUT/mnist: the four MNIST IDX files from MNIST_DIR (gzipped). About 40 MiB in all.
# On the GPU machine: python3 benchmarks/gpu_install.py OUT/wheels OUT/site (see docs/benchmarks.md).
set -euo pipefail

if [[ $# -lt 1 ]]; then
  echo "usage: $0 MNIST_DIR [OUT]   (MNIST_DIR: the four MNIST IDX files, .gz or raw)" >&2
  exit 2
fi
MNIST_DIR=$1
OUT=${2:-.gpu}
PYTHON=${PYTHON:-python3}
REPO=$(cd "$(dirname "$0")/.." && pwd)

# Pinned: the versions the suite was written against. tokamax's xprof is left out on purpose
# (22 MB; gpu_install.py stubs the one name tokamax imports from it).
WHEELS=(
  # Large-vocabulary losses.
  tokamax==0.0.17
  liger-kernel==0.8.5
  cut-cross-entropy==25.1.1
  # tokamax's dependencies beyond jax, flax and optax.
  einshape==1.0
  jaxtyping==0.3.11
  wadler-lindig==0.1.8
  pydantic==2.14.4
  pydantic-core==2.50.5
  annotated-types==0.8.0
  typing-inspection==0.4.5
  typing-extensions==4.16.0
  qwix==0.1.8
  immutabledict==4.3.1
  # train.py's (and tokamax's) dependencies beyond flax, optax and orbax.
  ml-collections==1.1.0
  tqdm==4.70.1
  tensorboardx==2.6.5
  matplotlib==3.11.2
  contourpy==1.4.0
  cycler==0.12.1
  fonttools==4.68.0
  kiwisolver==1.5.1
  pyparsing==3.3.3
  python-dateutil==2.9.0.post0
  six==1.17.0
)

mkdir -p "$OUT/wheels" "$OUT/mnist"
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --dest "$OUT/wheels" \
  --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
  "${WHEELS[@]}"
rm -f "$OUT"/wheels/jaxce-*.whl
"$PYTHON" -m pip wheel --quiet --no-deps --wheel-dir "$OUT/wheels" "$REPO"

for name in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte \
            t10k-labels-idx1-ubyte; do
  if [[ -f "$MNIST_DIR/$name.gz" ]]; then
    install -m 0644 "$MNIST_DIR/$name.gz" "$OUT/mnist/$name.gz"
  elif [[ -f "$MNIST_DIR/$name" ]]; then
    gzip -c "$MNIST_DIR/$name" > "$OUT/mnist/$name.gz"
  else
    echo "$0: $MNIST_DIR has no $name[.gz]" >&2
    exit 1
  fi
done

ls -l "$OUT/wheels" "$OUT/mnist"
du -sh "$OUT/wheels" "$OUT/mnist"
echo "total: $(du -sm "$OUT" | cut -f1) MiB (the GPU tool carries at most 64 MiB)"
