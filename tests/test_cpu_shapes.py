"""Issue 21, item 3: a CPU server's memory levels off although packed batches change their
token count almost every time.

oneDNN compiles and keeps one kernel per matmul shape (up to 1,024 of them), so every new
token count cost memory: on this project's bf16 CPU, 400 single-text requests of random length
took a process from 475 to 957 MB before `runtime/batch.py` bucketed the count the encoder
sees; 476 to 555 MB (then level) after. The encoder only ever sees bucketed counts, and the
outputs are those of sentence-transformers on the same weights.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import numpy as np
import pytest
import reference

from sie_server.config import Settings
from sie_server.engine import Engine
from sie_server.runtime.batch import bucket_tokens

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing".split()


def test_bucket_sizes_are_few_and_close():
    sizes = [bucket_tokens(n) for n in range(1, 8193)]
    assert all(s >= n and s - n <= max(7, n / 16) for n, s in zip(range(1, 8193), sizes))
    assert len(set(sizes)) <= 8 + 16 * 7  # 8 up to 64 tokens, then 16 per doubling
    assert bucket_tokens(2048) == 2048 and bucket_tokens(1934) == 1984


def test_encoder_sees_bucketed_counts_and_outputs_are_unchanged(minilm_dir):
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(WORDS, size=int(rng.integers(1, 200)))) for _ in range(24)]
    eng = Engine(Settings(models={MINILM: str(minilm_dir)}, default_models=[MINILM],
                          device="cpu", dtype="float32"))
    seen: list[int] = []
    encoder = eng.registry.get(MINILM).model.encoder
    handle = encoder.register_forward_pre_hook(lambda _m, args: seen.append(len(args[0])))
    try:
        ours = np.stack([r.dense for r in eng.encode(MINILM, texts)])
        alone = np.stack([eng.encode(MINILM, [t])[0].dense for t in texts[:4]])
    finally:
        handle.remove()
        eng.close()
    assert seen and all(n == bucket_tokens(n) for n in seen), seen
    ref = reference.st_encode(minilm_dir, texts)
    cos = (ours * ref).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() >= 0.9999, cos.min()
    assert np.abs(alone - ours[:4]).max() <= 1e-5


PROBE = """
import json, random, sys
from sie_server.config import Settings
from sie_server.engine import Engine
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
eng = Engine(Settings(models={"m": sys.argv[1]}, default_models=["m"], device="cpu"))
rng, words, out = random.Random(0), sys.argv[2].split(), []
for i in range(300):
    eng.encode("m", [" ".join(rng.choice(words) for _ in range(rng.randint(3, 240)))])
    out.append(rss())
print(json.dumps(out))
"""


def test_memory_levels_off_under_changing_batch_shapes(minilm_dir):
    """300 single-text requests of random length (1..256 tokens), dtype auto, in a fresh
    process: after 40 of them RSS grows by under 100 MB (before the buckets: ~300 MB)."""
    done = subprocess.run([sys.executable, "-c", PROBE, str(minilm_dir), " ".join(WORDS)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rss = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"RSS MB: start {rss[0]:.0f}, after 40 {rss[39]:.0f}, end {rss[-1]:.0f}")
    assert rss[-1] - rss[39] < 100, rss[::20]


FAULTS = """
import resource, sys
from sie_server.config import Settings
from sie_server.engine import Engine
eng = Engine(Settings(models={"m": sys.argv[1]}, default_models=["m"], device="cpu",
                      dtype="float32"))
words = sys.argv[2].split()
texts = [" ".join(words[(i + j) % len(words)] for j in range(180)) for i in range(48)]
eng.encode("m", texts)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    eng.encode("m", texts)
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 3)
"""


def test_a_cpu_forward_reuses_freed_memory(minilm_dir):
    """A CPU forward allocates the same tensor sizes batch after batch; by default glibc gives
    many of them back to the OS and faults their pages in again (bench/malloc.py: up to 1.26x
    the time). A CPU Engine keeps them (runtime/device.py `reuse_freed_memory`): a warm pass
    of 48 texts of ~180 tokens (five 2,048-token batches) faults under 10,000 pages (measured
    0.5k-1.8k here; 74k-135k with glibc's defaults), in a fresh process, as glibc's settings
    are the process's."""
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("the setting is glibc's (mallopt)")
    done = subprocess.run([sys.executable, "-c", FAULTS, str(minilm_dir), " ".join(WORDS)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    faults = int(done.stdout.strip().splitlines()[-1])
    assert faults < 10_000, faults
