#!/usr/bin/env bash
# Create .venv-sie-public: Python 3.12 with the public `sie-sdk` and its integrations, the
# environment tests/test_sie_public.py drives against our server (sie-sdk needs Python >= 3.12;
# it installs the import name `sie_sdk` as our SDK does, so it lives in its own environment).
# `sie-server` goes in without its dependencies: tests run its MUVERA code
# (core/postprocessor.py, numpy only) as the reference for ours (tests/test_muvera.py).
# Idempotent: quick when the pins below did not change. Prints the interpreter's path.
# With the argument `extract`: another environment, see below.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv-sie-public
pins=(sie-sdk==0.10.1 sie-langchain==0.10.1 sie-llamaindex==0.10.1 sie-qdrant==0.10.1
      sie-lancedb==0.10.1)
if [ "${1:-}" = extract ]; then
  # `setup-sie-public.sh extract`: .venv-sie-extract, the integrations whose extractor
  # components tests/test_gliner.py drives and whose dependencies (haystack-ai, dspy, crewai:
  # large, with pins of their own) must not touch .venv-sie-public
  venv=.venv-sie-extract
  pins=(sie-sdk==0.10.1 sie-haystack==0.10.1 sie-dspy==0.10.1 sie-crewai==0.10.1)
fi
nodeps=(sie-server==0.10.1)
stamp="$venv/.installed-$(echo "${pins[*]} ${nodeps[*]}" | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  py="${SIE_PUBLIC_PYTHON:-}"
  if [ -z "$py" ]; then  # an installed 3.12 (never downloaded): PATH, then pyenv's versions
    for c in python3.12 /root/.pyenv/versions/3.12*/bin/python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python3.12 /usr/bin/python3.12; do
      if "$c" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then py=$c; break; fi
    done
  fi
  if [ -z "$py" ]; then
    echo "no Python 3.12 interpreter found (set SIE_PUBLIC_PYTHON)" >&2
    exit 3
  fi
  rm -rf "$venv"
  "$py" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check "${pins[@]}" >&2
  "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps "${nodeps[@]}" >&2
  touch "$stamp"
fi
echo "$PWD/$venv/bin/python"
