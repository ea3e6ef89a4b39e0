"""`sie-server encode`'s in-process backend against the engine's own in-process throughput,
on the bench corpus, one loaded Engine for both, interleaved rounds, medians. Prints JSON.

The engine figure is bench.run's `inprocess` path (closed-loop client threads calling
Engine.submit). The command figure is the whole pipeline on the same texts written as a
JSONL file: reading, tokenizing, encoding, Arrow conversion and Parquet writing, wall time
from the first row read to the manifest's last write (model load excluded on both sides).

    PYTHONPATH=src python -m bench.encode_command --device cpu --model minilm --n 512
    PYTHONPATH=src python -m bench.encode_command --device cuda --model bge-m3-large \\
        --outputs dense,sparse,multivector --n 4096
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from . import corpus as corpus_mod
from .load import chunk, closed_loop_threads, engine_call
from .models import MODELS, REPO, model_folder
from .run import LOAD_SHAPE


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--model", choices=MODELS, default="minilm")
    p.add_argument("--model-dir")
    p.add_argument("--corpus", default="passages", choices=corpus_mod.KINDS)
    p.add_argument("--outputs", default="dense")
    p.add_argument("--n", type=int, default=512)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--concurrency", type=int, default=8)
    a = p.parse_args(argv)

    from sie_server.config import Settings
    from sie_server.corpus.backends import InProcessBackend
    from sie_server.corpus.readers import expand
    from sie_server.corpus.run import Job, run
    from sie_server.corpus.progress import Progress
    from sie_server.engine import Engine

    folder = model_folder(a.model, a.model_dir, REPO / ".cache" / "bench")
    outputs = a.outputs.split(",")
    tok = corpus_mod.load_tokenizer(folder / "tokenizer.json")
    texts = corpus_mod.make_corpus(a.corpus, a.n, tok).texts
    work = Path(tempfile.mkdtemp(prefix="sie-encode-bench-"))
    src = work / "corpus.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    engine = Engine(Settings(models={"m": str(folder)}, default_models=["m"], device=a.device,
                             dtype=a.dtype))
    engine.start()
    devtype = "cuda" if a.device.startswith("cuda") else "cpu"
    clients, size = LOAD_SHAPE[(devtype, a.corpus)]
    reqs = chunk(texts, size)
    call = engine_call(engine, "m", reqs, outputs)
    backend = InProcessBackend(engine, "m", outputs, {})
    closed_loop_threads(call, min(len(reqs), 2 * clients), clients)  # warm-up
    engine_tps, command_tps = [], []
    try:
        for r in range(a.rounds):
            s = closed_loop_threads(call, len(reqs), clients).summary()
            engine_tps.append(s["tokens_per_s"])
            out = work / f"out-{r}"
            job = Job(files=expand([str(src)]), output=out, output_types=outputs,
                      batch_size=a.batch_size, concurrency=a.concurrency)
            summary = run(job, backend, Progress(tty=False, interval_s=1e9, stream=sys.stderr))
            command_tps.append(summary["tokens_this_run"] / summary["seconds"])
            assert summary["tokens"] == s["tokens"], (summary["tokens"], s["tokens"])
            shutil.rmtree(out)
            print(f"round {r}: engine {engine_tps[-1]:,.0f} tok/s, command "
                  f"{command_tps[-1]:,.0f} tok/s", file=sys.stderr)
    finally:
        engine.close()
        shutil.rmtree(work, ignore_errors=True)
    e, c = statistics.median(engine_tps), statistics.median(command_tps)
    report = {"model": a.model, "device": a.device, "corpus": a.corpus, "n": a.n,
              "outputs": outputs, "engine_clients": clients, "engine_request_size": size,
              "command_batch_size": a.batch_size, "command_concurrency": a.concurrency,
              "engine_tokens_per_s": round(e, 1), "command_tokens_per_s": round(c, 1),
              "command_vs_engine": round(c / e, 3), "target": 0.9,
              "rounds": {"engine": engine_tps, "command": [round(x, 1) for x in command_tps]}}
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
