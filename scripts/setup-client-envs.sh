#!/usr/bin/env bash
# Create the environments of the drop-in clients that tests/test_dropin.py drives against our
# server, one per set of pins that clash (huggingface-hub 2.x vs langchain-huggingface's < 2;
# infinity-client's httpx < 0.28): .venv-clients-<group>. Usage: setup-client-envs.sh GROUP;
# idempotent (quick when the pins did not change); prints the interpreter's path.
set -euo pipefail
cd "$(dirname "$0")/.."
group=${1:?usage: setup-client-envs.sh hub|langchain|infinity}
case "$group" in
  hub) pins=(huggingface-hub==2.4.0 cohere==7.3.1
             llama-index-embeddings-text-embeddings-inference==0.6.0
             llama-index-postprocessor-tei-rerank==0.6.0
             llama-index-postprocessor-jinaai-rerank==0.6.0) ;;
  langchain) pins=(langchain-huggingface==1.2.3 numpy) ;;  # numpy: InferenceClient's vectors
  infinity) pins=(infinity-client==0.0.78) ;;
  *) echo "unknown group $group" >&2; exit 2 ;;
esac
venv=.venv-clients-$group
stamp="$venv/.installed-$(echo "${pins[*]}" | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check "${pins[@]}" >&2
  touch "$stamp"
fi
echo "$PWD/$venv/bin/python"
