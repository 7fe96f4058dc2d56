#!/usr/bin/env bash
# Wheels for a GPU machine that cannot reach a package index and already has torch, h5py, transformers,
# einops, safetensors, click, pillow, regex, tqdm and pytest: sdport itself and what it and the reference
# side import beyond those, at the versions installed here, for the other machine's Python.
#
#   bash bench/gpu_wheels.sh [DIR] [PYTHON_VERSION]        # defaults: .whl 3.12; run it where pip works
#
# Copy the repository with DIR (about 13 MB here) to the GPU machine, then, from its root there:
#
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
#   PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH bash bench/gpu_checks.sh full cuda
#
# The list is what `bash bench/gpu_checks.sh tiny cpu` imported (a record of sys.modules at exit), less
# what that machine has; importlib_metadata is there for diffusers' declared requirement.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-.whl}
PYV=${2:-3.12}
PY=${PY:-.venv/bin/python}
NEEDED=(diffusers importlib_metadata ftfy wcwidth omegaconf stable-diffusion-sdkit zlib-ng)

pins=()
for name in "${NEEDED[@]}"; do
  version=$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name") || {
    echo "error: $name is not installed in $PY (make setup installs it)" >&2; exit 1; }
  pins+=("$name==$version")
done
rm -rf "$DIR.partial"
mkdir -p "$DIR.partial"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$DIR.partial" "${pins[@]}"
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DIR.partial" .
rm -rf build  # setuptools' scratch copy of the package, which a later build would start from
rm -rf "$DIR"
mv "$DIR.partial" "$DIR"
ls -1 "$DIR"
