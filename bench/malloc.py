"""glibc's malloc defaults against the engine's (`runtime/device.py` reuse_freed_memory), on
all-MiniLM-L6-v2 encoding a benchmark corpus in-process:

    PYTHONPATH=src python -m bench.malloc --dtype int8 [--corpus passages] [--n 256] [--rounds 2]

Each round runs one fresh process per setting (glibc's settings are the process's), in turn;
each encodes the corpus twice to warm up, then times five passes and counts the minor page
faults. Prints the median seconds, faults per pass, and defaults / engine, with the CPU's flags.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

from .roofline import cpu_flags

_CHILD = """
import json, resource, statistics, sys, time
from bench.profile import minilm_engine
from sie_server.engine import engine as engine_module
setting, dtype, corpus, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
if setting == "glibc":
    engine_module.reuse_freed_memory = lambda: False
engine, encode_all = minilm_engine(dtype, corpus, n)
def timed():
    start = time.perf_counter()
    encode_all()
    return time.perf_counter() - start
encode_all(); encode_all()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
times = [timed() for _ in range(5)]
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / 5
engine.close()
print(json.dumps({"s": statistics.median(times), "faults": faults}))
"""


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="auto", help="the engine's --dtype")
    ap.add_argument("--corpus", default="passages", choices=("passages", "queries"))
    ap.add_argument("--n", type=int, default=256, help="texts in the corpus")
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args(argv)
    runs: dict[str, list[dict]] = {"glibc": [], "engine": []}
    for _ in range(a.rounds):
        for setting, found in runs.items():
            done = subprocess.run([sys.executable, "-c", _CHILD, setting, a.dtype, a.corpus,
                                   str(a.n)], capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"the {setting} run failed:\n{done.stderr[-3000:]}")
            found.append(json.loads(done.stdout.strip().splitlines()[-1]))
    out = {k: {"seconds": [round(r["s"], 3) for r in v],
               "faults_per_pass": [int(r["faults"]) for r in v]} for k, v in runs.items()}
    glibc, ours = (statistics.median(r["s"] for r in runs[k]) for k in ("glibc", "engine"))
    out.update(dtype=a.dtype, corpus=f"{a.n} {a.corpus}", flags=cpu_flags(),
               glibc_over_engine=round(glibc / ours, 3))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
