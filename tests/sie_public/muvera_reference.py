"""SIE's own MUVERA (sie-server 0.10.1, core/postprocessor.py) on given multivectors; run in
.venv-sie-public by tests/test_muvera.py.

    python muvera_reference.py CASES.json VECTORS.npz OUT.npz

CASES.json: [{"name", "config": SIE's muvera_config keys, "is_query", "items": [keys of
VECTORS.npz]}]. OUT.npz: per case name, SIE's encodings (items x dim, float32).
"""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import numpy as np
from sie_server.core.postprocessor import MuveraConfig, MuveraPostprocessor


def main() -> None:
    cases = json.loads(open(sys.argv[1]).read())
    with np.load(sys.argv[2]) as z:
        vectors = {k: z[k] for k in z.files}
    out = {}
    for case in cases:
        items = [vectors[k] for k in case["items"]]
        post = MuveraPostprocessor(token_dim=items[0].shape[1], config=MuveraConfig(**case["config"]))
        output = SimpleNamespace(multivector=items, dense=None, dense_dim=None)
        post.transform(output, is_query=case["is_query"])
        out[case["name"]] = np.asarray(output.dense, np.float32)
    np.savez(sys.argv[3], **out)


if __name__ == "__main__":
    main()
