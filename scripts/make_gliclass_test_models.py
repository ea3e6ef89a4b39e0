#!/usr/bin/env python
"""Write small GLiClass uni-encoder checkpoints with seeded random weights, in the hub layout.

The layout is what `gliclass` (PyPI 0.1.17) saves and the hub's knowledgator/gliclass-*
repositories hold: ``config.json`` (a ``GLiClass`` config with the backbone's
``encoder_config`` and the ``<<LABEL>>`` token's id as ``class_token_index``),
``model.safetensors`` (``model.encoder_model.*``, ``model.text_projector.*``,
``model.classes_projector.*``, ``model.scorer.*``, ``model.lstm.lstm.*`` with ``use_lstm``,
``model.logit_scale``) and the backbone tokenizer with ``<<LABEL>>``, ``<<SEP>>`` and
``<<EXAMPLE>>`` added. The model is built by `gliclass` itself, then every parameter is redrawn
from a seeded generator (std gain / sqrt(fan_in) for matrices).

Backbones (no hub here), as scripts/make_gliner_test_models.py makes them: ``deberta`` a
DeBERTa-v3-shaped encoder with the real XLM-R tokenizer, ``bert`` a BERT encoder with
all-MiniLM-L6-v2's WordPiece tokenizer; ``modernbert`` the tiny ModernBERT of
scripts/make_modernbert_test_models.py (sliding-window layers, its byte-level BPE). Options are
GLiClass config keys
(``scorer_type``, ``prompt_first``, ``use_lstm``, ``normalize_features``,
``embed_class_token``, ``class_token_pooling``...).

    python scripts/make_gliclass_test_models.py OUT_DIR [--backbone deberta|bert|modernbert]
        [--set key=json_value ...]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
from pathlib import Path

import torch
import make_modernbert_test_models as modernbert
from make_gliner_test_models import HUB_BACKBONES, _backbone

MARKERS = ["<<LABEL>>", "<<SEP>>", "<<EXAMPLE>>"]


def build(out: Path, backbone: str = "deberta", seed: int = 0, hidden: int = 64,
          layers: int = 2, **options) -> Path:
    """Write one checkpoint to `out` (a fresh folder) and return it."""
    from gliclass import GLiClassModel
    from gliclass.config import GLiClassModelConfig
    from transformers import AutoConfig, AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "backbone"
        if backbone == "modernbert":
            base.mkdir()
            shape = modernbert.SHAPES["test"]
            (base / "config.json").write_text(json.dumps(modernbert.config("gte", shape)))
            modernbert.write_tokenizer(base, modernbert.MAX_POS)
        else:
            _backbone(base, backbone, hidden, layers)
        tok = AutoTokenizer.from_pretrained(str(base))
        tok.add_tokens(MARKERS)
        encoder = AutoConfig.from_pretrained(str(base)).to_dict()
        encoder["vocab_size"] = len(tok)
        label_id = tok.convert_tokens_to_ids(MARKERS[0])
        config = GLiClassModelConfig(
            encoder_config=encoder, encoder_model=HUB_BACKBONES.get(backbone, "answerdotai/ModernBERT-base"),
            class_token_index=label_id, vocab_size=len(tok), architecture_type="uni-encoder",
            dropout=0.0, **options)
        model = GLiClassModel(config)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() >= 2:
                    gain = 0.5 if "encoder_model" in name else 1.0
                    p.copy_(torch.randn(p.shape, generator=gen) * gain / math.sqrt(p.shape[-1]))
                elif "LayerNorm" in name:
                    p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
                elif name.endswith("logit_scale"):
                    p.fill_(2.5)
                else:
                    p.copy_(0.05 * torch.randn(p.shape, generator=gen))
        if out.exists():
            shutil.rmtree(out)
        model.save_pretrained(out)
        tok.save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--backbone", choices=("deberta", "bert", "modernbert"), default="deberta")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=JSON")
    args = parser.parse_args()
    options = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)}
    print(build(args.out, args.backbone, args.seed, args.hidden, args.layers, **options))


if __name__ == "__main__":
    main()
