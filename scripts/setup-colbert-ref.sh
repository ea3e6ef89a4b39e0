#!/usr/bin/env bash
# Create .colbert-ref: the ColBERT reference libraries (PyLate, Stanford colbert-ai) that
# tests/test_colbert.py runs as subprocesses with PYTHONPATH=.colbert-ref over .venv.
# pylate 1.6.0 pins sentence-transformers==5.3.0 and fast-plaid (torch 2.7), clashing with the
# test extra (sentence-transformers 5.7, torch 2.13); encoding needs neither fast-plaid nor
# the newer sentence-transformers, so the packages go in --no-deps into their own folder,
# with sentence-transformers 5.3.0 shadowing 5.7 there, and the few modules colbert-ai imports
# that .venv lacks. Idempotent: quick when the pins below did not change. Prints the folder.
set -euo pipefail
cd "$(dirname "$0")/.."
target=.colbert-ref
pins=(pylate==1.6.0 colbert-ai==0.2.22 sentence-transformers==5.3.0 ujson==5.12.0
      bitarray==3.12.3 GitPython==3.2.1 gitdb==4.0.12 smmap==5.0.3)
stamp="$target/.installed-$(echo "${pins[*]}" | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  rm -rf "$target"
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps --target "$target" \
    "${pins[@]}" >&2
  touch "$stamp"
fi
echo "$PWD/$target"
