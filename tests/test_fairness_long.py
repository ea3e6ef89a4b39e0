"""Issue 21, item 1 on the real engine: small requests behind long documents (items 8x longer
than the batch budget, under a LoRA adapter, from an API-key tenant) run within the fair
queue's bound of C + 1 batches (C: clients queued), not after the whole long request, as they
did before; a request to a second model is not held up at all. The worker is held with a gate
around the real forward so that everything is queued before the first batch is formed."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import LEGAL_LORA, held_worker
from sie_server.config import Settings
from sie_server.engine import Engine

M3 = "BAAI/bge-m3"
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
BUDGET = 256  # --max-batch-tokens
DOC = "lorem ipsum dolor sit amet, consectetur adipiscing elit. " * 120


@pytest.fixture(scope="module")
def engine(bge_m3_dir, legal_lora):
    eng = Engine(Settings(models={M3: str(bge_m3_dir)}, default_models=[], device="cpu",
                          dtype="float32", adapter_roots=[legal_lora["root"]],
                          max_batch_tokens=BUDGET))
    eng.encode(M3, ["warm"], options={"lora_id": LEGAL_LORA})
    eng.encode(MINILM, ["warm"])
    yield eng
    eng.close()


def test_small_requests_run_within_the_bound_behind_long_documents(engine):
    with held_worker(engine, M3) as (_, release, batches):
        docs = engine.submit(M3, [DOC] * 10, ["dense", "sparse"], {"lora_id": LEGAL_LORA},
                             tenant="key-docs")
        smalls = [engine.submit(M3, ["a short query"], tenant="key-queries"),
                  engine.submit(M3, ["short, under the adapter"], options={"lora_id": LEGAL_LORA},
                                tenant="key-other"),
                  engine.submit(M3, ["no key at all", "two items"])]
        clients = 4  # key-docs, key-queries, key-other and the keyless request
        other_model = engine.submit(MINILM, ["another model is not held up"])
        assert len(other_model.result(60)) == 1 and not docs.done()
        release()
        small_out = [f.result(120) for f in smalls]
        doc_out = docs.result(300)

    doc_req = next(r for b in batches for r, _ in b if len(r.tokens) == 10)
    assert all(len(t) > 4 * BUDGET for t in doc_req.tokens)  # items far over the budget
    assert sum(1 for b in batches if any(r is doc_req for r, _ in b)) == 10  # one batch each
    for f in smalls:
        first = next(k for k, b in enumerate(batches) if any(r.future is f for r, _ in b))
        assert 1 <= first <= clients + 1, (first, len(batches))  # batch 0 is the blocker
    # nothing lost or mixed: each result equals the same text encoded alone
    alone = engine.encode(M3, [DOC], ["dense", "sparse"], {"lora_id": LEGAL_LORA})[0]
    np.testing.assert_allclose(doc_out[9].dense, alone.dense, atol=1e-5)
    np.testing.assert_array_equal(doc_out[9].sparse[0], alone.sparse[0])
    for texts, out, opts in ((["a short query"], small_out[0], None),
                             (["short, under the adapter"], small_out[1], {"lora_id": LEGAL_LORA}),
                             (["no key at all", "two items"], small_out[2], None)):
        for text, got in zip(texts, out):
            np.testing.assert_allclose(got.dense, engine.encode(M3, [text], options=opts)[0].dense,
                                       atol=1e-5)
