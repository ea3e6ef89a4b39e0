"""Where the engine's CPU time goes, op by op, on all-MiniLM-L6-v2 and a benchmark corpus:

    PYTHONPATH=src python -m bench.profile --dtype int8 [--corpus passages] [--n 256]

Encodes the corpus in-process (requests of 16 texts, all queued at once, as the engine batches
them) twice to warm up, then once under `torch.profiler` with every thread recorded (the
scheduler's worker runs the forward), and prints the ops by self CPU time, with the CPU's
flags. Times are per op summed over threads; shares are of the profiled total.
"""

from __future__ import annotations

import argparse
from typing import Any, Callable

import torch

from .corpus import make_corpus
from .models import minilm_folder
from .roofline import cpu_flags


def minilm_engine(dtype: str, corpus: str, n: int) -> tuple[Any, Callable[[], None]]:
    """An in-process CPU Engine serving all-MiniLM-L6-v2 at `dtype`, and a function that
    encodes the corpus through it (requests of 16 texts, all queued at once)."""
    from sie_server.config import Settings
    from sie_server.engine import Engine

    folder = minilm_folder()
    texts = make_corpus(corpus, n, folder / "tokenizer.json").texts
    engine = Engine(Settings(models={"minilm": str(folder)}, default_models=[], device="cpu",
                             dtype=dtype))
    requests = [texts[i:i + 16] for i in range(0, len(texts), 16)]

    def encode_all() -> None:
        for future in [engine.submit("minilm", r) for r in requests]:
            future.result()

    return engine, encode_all


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="auto", help="the engine's --dtype (auto, float32, "
                    "bfloat16, int8)")
    ap.add_argument("--corpus", default="passages", choices=("passages", "queries"))
    ap.add_argument("--n", type=int, default=256, help="texts in the corpus")
    ap.add_argument("--rows", type=int, default=20, help="ops shown")
    a = ap.parse_args(argv)

    engine, encode_all = minilm_engine(a.dtype, a.corpus, a.n)
    try:
        encode_all()
        encode_all()
        config = torch._C._profiler._ExperimentalConfig(profile_all_threads=True)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                    experimental_config=config) as prof:
            encode_all()
    finally:
        engine.close()
    print(f"all-MiniLM-L6-v2, {a.n} {a.corpus}, --dtype {a.dtype} "
          f"({engine.placement.dtype_name}), {torch.get_num_threads()} threads, "
          f"flags {', '.join(cpu_flags())}")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.rows,
                                    max_name_column_width=50))


if __name__ == "__main__":
    main()
