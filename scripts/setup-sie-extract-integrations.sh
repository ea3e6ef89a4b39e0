#!/usr/bin/env bash
# Create .venv-sie-extract: Python 3.12 with the public `sie-sdk` and the integrations whose
# extractor components call `extract` and whose dependencies (haystack-ai, dspy, crewai: large,
# with pins of their own) must not touch .venv-sie-public: sie-haystack, sie-dspy, sie-crewai.
# tests/test_gliner.py drives them against our server. Idempotent; prints the interpreter's path;
# exit status 3 when no Python 3.12 is installed (the test then skips).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv-sie-extract
pins=(sie-sdk==0.10.1 sie-haystack==0.10.1 sie-dspy==0.10.1 sie-crewai==0.10.1)
stamp="$venv/.installed-$(echo "${pins[*]}" | sha1sum | cut -c1-12)"
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
  touch "$stamp"
fi
echo "$PWD/$venv/bin/python"
