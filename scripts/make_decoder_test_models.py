#!/usr/bin/env python
"""Write small decoder models (random weights) in the hub checkpoint layout of the real ones.

No Qwen tokenizer or weights exist offline, so each folder gets a small byte-level BPE
tokenizer trained here with `tokenizers` on the multilingual test texts, built like Qwen's
tokenizer.json (NFC, Qwen2's split regex, byte-level, `<|endoftext|>` `<|im_start|>`
`<|im_end|>` specials, `<think>` `</think>` added tokens; "yes" and "no" single tokens), and
seeded weights (Linear ~ N(0, 1/fan_in), norms ~1) so that outputs differ clearly per text.

Written without transformers (names and config.json as transformers saves them), so the
same script runs where transformers differs; the tests load every folder with transformers.

Variants (`build(out, variant)`):
- ``qwen3-embedding``: as Qwen/Qwen3-Embedding-0.6B: a saved ``Qwen3Model`` (names without
  ``model.``), tied embeddings, head_dim * heads != hidden, GQA, q_norm/k_norm, a tokenizer
  post-processor appending ``<|endoftext|>``, the sentence-transformers files (last-token
  pooling, Normalize, ``prompts``);
- ``qwen3-embedding-sharded``: the same weights in two shards + model.safetensors.index.json;
- ``qwen3-reranker``: as Qwen/Qwen3-Reranker-0.6B: ``Qwen3ForCausalLM`` (``model.`` names),
  tied embeddings, no EOS post-processor; ``qwen3-reranker-untied``: with its own lm_head
  (as the 8B);
- ``qwen2-embedding``: as gte-Qwen2: ``Qwen2Model`` with q/k/v biases, untied, last token;
- ``mistral-embedding``: as e5-mistral: ``MistralModel`` with a BOS + EOS template, no biases;
- ``llama-mean``: ``LlamaModel`` with linear rope scaling and mean pooling.

    python scripts/make_decoder_test_models.py OUT_DIR [--variant NAME] [--seed N] [--shape S]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

VARIANTS = ("qwen3-embedding", "qwen3-embedding-sharded", "qwen3-reranker",
            "qwen3-reranker-untied", "qwen2-embedding", "mistral-embedding", "llama-mean")
HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM, INTERMEDIATE = 64, 2, 4, 2, 32, 128
# shapes for speed runs (bench/): hidden, layers, heads, kv heads, head_dim, intermediate
SHAPES = {"test": (HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM, INTERMEDIATE),
          "small": (256, 4, 8, 4, 64, 768),
          "qwen3-0.6b": (1024, 28, 16, 8, 128, 3072)}  # Qwen/Qwen3-Embedding-0.6B
VOCAB_TARGET = 3000
MAX_POS = 32768
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
              r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN3_PROMPTS = {"query": "Instruct: Given a web search query, retrieve relevant passages that "
                          "answer the query\nQuery:", "document": ""}


def _corpus() -> list[str]:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from texts import SHORT_TEXTS, miracl_passages

    return [*SHORT_TEXTS, *miracl_passages()[:120], *["yes no " * 50] * 20]


def tokenizer(style: str):
    """A trained byte-level BPE `tokenizers.Tokenizer`; style "eos" appends <|endoftext|>,
    "bos-eos" wraps in <s> ... </s> (Llama/Mistral), "none" adds nothing (Qwen base)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, \
        processors, trainers

    specials = QWEN_SPECIALS if style != "bos-eos" else ["<unk>", "<s>", "</s>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>" if style == "bos-eos" else None))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_TARGET, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_corpus(), trainer)
    if style != "bos-eos":
        tok.add_tokens(["<think>", "</think>"])
    if style == "eos":
        eos = tok.token_to_id("<|endoftext|>")
        tok.post_processor = processors.TemplateProcessing(
            single="$A:0 <|endoftext|>:0", pair="$A:0 <|endoftext|>:0 $B:1 <|endoftext|>:1",
            special_tokens=[("<|endoftext|>", eos)])
    elif style == "bos-eos":
        tok.post_processor = processors.TemplateProcessing(
            single="<s>:0 $A:0 </s>:0", pair="<s>:0 $A:0 </s>:0 <s>:1 $B:1 </s>:1",
            special_tokens=[("<s>", tok.token_to_id("<s>")), ("</s>", tok.token_to_id("</s>"))])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    for word in ("yes", "no"):
        if len(tok.encode(word, add_special_tokens=False).ids) != 1:
            raise RuntimeError(f"the trained tokenizer splits {word!r}")
    return tok


ARCH = {"qwen3": ("qwen3", "Qwen3"), "qwen2": ("qwen2", "Qwen2"),
        "mistral": ("mistral", "Mistral"), "llama": ("llama", "Llama")}


def _config(variant: str, vocab: int, special_ids: dict[str, int], shape: str) -> dict:
    """config.json as transformers writes it for the architecture."""
    hidden, layers, heads, kv_heads, head_dim, inter = SHAPES[shape]
    kind, arch = ARCH[variant.split("-")[0]]
    causal_lm = "reranker" in variant
    qwen = kind.startswith("qwen")
    bos = special_ids["<|endoftext|>"] if qwen else special_ids["<s>"]
    eos = special_ids["<|endoftext|>"] if qwen else special_ids["</s>"]
    c = {"architectures": [f"{arch}{'ForCausalLM' if causal_lm else 'Model'}"],
         "model_type": kind, "vocab_size": vocab, "hidden_size": hidden,
         "num_hidden_layers": layers, "num_attention_heads": heads,
         "num_key_value_heads": kv_heads, "intermediate_size": inter, "hidden_act": "silu",
         "max_position_embeddings": MAX_POS, "rms_norm_eps": 1e-6,
         "rope_theta": 1e6 if qwen else 1e4, "rope_scaling": None, "attention_dropout": 0.0,
         "bos_token_id": bos, "eos_token_id": eos, "tie_word_embeddings": False,
         "torch_dtype": "float32", "use_cache": True}
    if kind == "qwen3":
        c.update(head_dim=head_dim, attention_bias=False, use_sliding_window=False,
                 sliding_window=None, max_window_layers=layers,
                 tie_word_embeddings=not variant.endswith("untied"))
    elif kind == "qwen2":
        c.update(use_sliding_window=False, sliding_window=MAX_POS, max_window_layers=layers)
    elif kind == "mistral":
        c.update(sliding_window=4096)
    else:
        c.update(attention_bias=False, mlp_bias=False,
                 rope_scaling={"rope_type": "linear", "factor": 2.0})
    return c


def _weights(c: dict, seed: int, causal_lm: bool) -> dict[str, torch.Tensor]:
    """Seeded weights with the checkpoint's names (`model.` prefix for *ForCausalLM)."""
    g = torch.Generator().manual_seed(seed)
    h, inter = c["hidden_size"], c["intermediate_size"]
    hd = c.get("head_dim") or h // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    pre = "model." if causal_lm else ""
    sd: dict[str, torch.Tensor] = {}

    def linear(name: str, fan_out: int, fan_in: int, bias: bool = False) -> None:
        sd[f"{name}.weight"] = torch.randn(fan_out, fan_in, generator=g) / fan_in ** 0.5
        if bias:
            sd[f"{name}.bias"] = torch.randn(fan_out, generator=g) * 0.1

    def norm(name: str, dim: int, scale: float = 1.0) -> None:
        sd[f"{name}.weight"] = (1.0 + torch.randn(dim, generator=g) * 0.1) * scale

    sd[f"{pre}embed_tokens.weight"] = torch.randn(c["vocab_size"], h, generator=g)
    for i in range(c["num_hidden_layers"]):
        p = f"{pre}layers.{i}"
        norm(f"{p}.input_layernorm", h)
        bias = c["model_type"] == "qwen2"
        linear(f"{p}.self_attn.q_proj", q, h, bias)
        linear(f"{p}.self_attn.k_proj", kv, h, bias)
        linear(f"{p}.self_attn.v_proj", kv, h, bias)
        linear(f"{p}.self_attn.o_proj", h, q)
        if c["model_type"] == "qwen3":
            norm(f"{p}.self_attn.q_norm", hd)
            norm(f"{p}.self_attn.k_norm", hd)
        norm(f"{p}.post_attention_layernorm", h)
        linear(f"{p}.mlp.gate_proj", inter, h)
        linear(f"{p}.mlp.up_proj", inter, h)
        linear(f"{p}.mlp.down_proj", h, inter)
    # rerankers: a smaller final norm keeps the yes/no logits unsaturated
    norm(f"{pre}norm", h, 0.1 if causal_lm else 1.0)
    if causal_lm and not c["tie_word_embeddings"]:
        linear("lm_head", c["vocab_size"], h)
    return sd


def _save(sd: dict[str, torch.Tensor], out: Path, sharded: bool, dtype: torch.dtype) -> None:
    """model.safetensors, or one shard per layer plus model.safetensors.index.json."""
    from safetensors.torch import save_file

    sd = {k: v.to(dtype).contiguous() for k, v in sd.items()}
    if not sharded:
        save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in sd.items():
        layer = key.split("layers.")[1].split(".")[0] if "layers." in key else "rest"
        groups.setdefault(layer, {})[key] = t
    names = sorted(groups, key=lambda x: -1 if x == "rest" else int(x))
    weight_map = {}
    for n, name in enumerate(names, 1):
        fname = f"model-{n:05d}-of-{len(names):05d}.safetensors"
        save_file(groups[name], str(out / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(groups[name], fname))
    total = sum(t.numel() * t.element_size() for t in sd.values())
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def _sentence_transformers_files(out: Path, pooling: str, prompts: dict[str, str] | None,
                                 max_len: int, dim: int) -> None:
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
               {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]
    (out / "modules.json").write_text(json.dumps(modules, indent=2))
    (out / "1_Pooling").mkdir(exist_ok=True)
    (out / "2_Normalize").mkdir(exist_ok=True)
    modes = {f"pooling_mode_{m}": m == pooling for m in
             ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens",
              "weightedmean_tokens", "lasttoken")}
    (out / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": dim, **modes, "include_prompt": True}, indent=2))
    (out / "sentence_bert_config.json").write_text(json.dumps(
        {"max_seq_length": max_len, "do_lower_case": False}))
    (out / "config_sentence_transformers.json").write_text(json.dumps(
        {"prompts": prompts or {}, "default_prompt_name": None, "similarity_fn_name": "cosine"},
        indent=2))


def build(out_dir: Path, variant: str = "qwen3-embedding", seed: int = 0, shape: str = "test",
          dtype: torch.dtype = torch.float32) -> Path:
    """Write the folder of `variant` (of size `shape`, saved in `dtype`) to ``out_dir``."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; one of {VARIANTS}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    style = ("eos" if variant.startswith(("qwen3-embedding", "qwen2")) else
             "none" if variant.startswith("qwen3-reranker") else "bos-eos")
    tok = tokenizer(style)
    tok.save(str(out / "tokenizer.json"))
    specials = {t: tok.token_to_id(t) for t in [*QWEN_SPECIALS, "<s>", "</s>", "<unk>"]
                if tok.token_to_id(t) is not None}
    if style == "bos-eos":
        tok_config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
                      "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "</s>"}
    else:
        tok_config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>",
                      "pad_token": "<|endoftext|>", "additional_special_tokens":
                          ["<|im_start|>", "<|im_end|>"]}
    tok_config["model_max_length"] = MAX_POS
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
    config = _config(variant, tok.get_vocab_size(), specials, shape)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    _save(_weights(config, seed, "reranker" in variant), out, variant.endswith("sharded"), dtype)
    if "embedding" in variant:
        prompts = (QWEN3_PROMPTS if variant.startswith("qwen3") else
                   {"query": "Instruct: Given a web search query, retrieve relevant passages "
                             "that answer the query\nQuery: "})
        _sentence_transformers_files(out, "lasttoken", prompts, 8192, config["hidden_size"])
    elif variant == "llama-mean":
        _sentence_transformers_files(out, "mean_tokens", None, 4096, config["hidden_size"])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--variant", choices=VARIANTS, default="qwen3-embedding")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shape", choices=SHAPES, default="test")
    args = ap.parse_args(argv)
    print(build(args.out_dir, args.variant, args.seed, args.shape))
    return 0


if __name__ == "__main__":
    sys.exit(main())
