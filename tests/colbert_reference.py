"""Run a reference ColBERT library on a model folder (a subprocess of tests/test_colbert.py,
with the packages of scripts/setup-colbert-ref.sh on PYTHONPATH).

    python colbert_reference.py pylate|colbert-ai IN.json OUT.npz

IN.json: {"folders": [...], "queries": [...], "documents": [...]}, and optionally
"lengths": PyLate's query_length / document_length. OUT.npz, for the j-th
folder: `{j}/q{i}` / `{j}/d{i}` the multivector of each text (tokens x dim, float32) and
`{j}/scores` (queries x documents) MaxSim, each as the library computes it.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import torch


def pylate(folder: str, queries: list[str], documents: list[str], **lengths):
    from pylate import models, scores

    model = models.ColBERT(folder, device="cpu", **lengths)
    q = model.encode(queries, is_query=True, batch_size=len(queries), convert_to_numpy=True)
    d = model.encode(documents, is_query=False, batch_size=len(documents), convert_to_numpy=True)
    # one pair at a time (no padding); PyLate sums over query tokens, ColBERT's MaxSim as
    # compared here is the mean
    s = np.array([[float(scores.colbert_scores(torch.from_numpy(qi)[None],
                                               torch.from_numpy(di)[None])[0, 0]) / len(qi)
                   for di in d] for qi in q])
    return list(q), list(d), s


def colbert_ai(folder: str, queries: list[str], documents: list[str], **lengths):
    assert not lengths, "colbert-ai runs at its checkpoint's lengths here"
    from colbert.infra import ColBERTConfig
    from colbert.modeling.checkpoint import Checkpoint

    ckpt = Checkpoint(folder, colbert_config=ColBERTConfig(), verbose=0).cpu()
    with torch.inference_mode():
        q = ckpt.queryFromText(queries, bsize=len(queries)).float()
        d = ckpt.docFromText(documents, bsize=len(documents), keep_dims=False)
    d = [x.float() for x in (d[0] if isinstance(d, tuple) else d)]
    s = np.array([[float((qi @ di.T).max(dim=1).values.mean()) for di in d] for qi in q])
    return [x.numpy() for x in q], [x.numpy() for x in d], s


def main() -> None:
    kind, src, dst = sys.argv[1:4]
    spec = json.loads(open(src).read())
    run = {"pylate": pylate, "colbert-ai": colbert_ai}[kind]
    arrays = {}
    for j, folder in enumerate(spec["folders"]):
        q, d, s = run(folder, spec["queries"], spec["documents"], **spec.get("lengths", {}))
        arrays[f"{j}/scores"] = np.asarray(s, np.float32)
        arrays.update({f"{j}/q{i}": np.asarray(x, np.float32) for i, x in enumerate(q)})
        arrays.update({f"{j}/d{i}": np.asarray(x, np.float32) for i, x in enumerate(d)})
    np.savez(dst, **arrays)


if __name__ == "__main__":
    main()
