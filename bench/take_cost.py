"""Batch formation cost for one API key with many requests: the scheduler's `_take` alone (no
threads, no model), best of 5. Compare two trees with PYTHONPATH:

    PYTHONPATH=OLD/src python -m bench.take_cost old; PYTHONPATH=src python -m bench.take_cost new
"""
from __future__ import annotations

import collections
import sys
import threading
import time
import types

import numpy as np

from sie_server.engine import scheduler as S
from sie_server.engine.request import Request
from sie_server.metrics import Metrics

def make():
    s = object.__new__(S.Scheduler)
    s.model = types.SimpleNamespace(spec=types.SimpleNamespace(name="m"))
    s.max_batch_tokens, s.max_batch_items, s.max_queued_tokens = 2048, 1024, 10**9
    s.metrics, s._label, s._in_flight = Metrics(), "m", 0
    s._cond, s._closing = threading.Condition(), False
    if hasattr(S, "FairQueue"):
        s._queue = S.FairQueue(2048, 1024)
    else:
        s._clients, s._queued_tokens = collections.OrderedDict(), 0
    return s

rng = np.random.default_rng(0)
lengths = rng.integers(16, 512, size=20000)
best = []
for _ in range(5):
    s = make()
    for k in range(0, len(lengths), 256):  # 256-item requests, one client (no tenant)
        s.submit(Request([np.zeros(n, np.int64) for n in lengths[k:k+256]], list(lengths[k:k+256]), frozenset({"dense"}), tenant="one"))
    t = time.perf_counter(); batches = 0; items = 0
    while True:
        with s._cond:
            empty = not (s._queue if hasattr(S, "FairQueue") else s._clients)
        if empty: break
        b = s._take(); batches += 1; items += len(b)
    best.append((time.perf_counter() - t) / batches * 1e6)
print(sys.argv[1] if len(sys.argv) > 1 else "this tree", "batches", batches, "items", items, "us/batch best", round(min(best), 1))
