#!/usr/bin/env python
"""Write small decoder models (random weights) in the hub checkpoint layout of the real ones.

No Qwen tokenizer or weights exist offline, so each folder gets a small byte-level BPE
tokenizer trained here with `tokenizers` on the multilingual test texts, built like Qwen's
tokenizer.json (NFC, Qwen2's split regex, byte-level, `<|endoftext|>` `<|im_start|>`
`<|im_end|>` specials, `<think>` `</think>` added tokens; "yes" and "no" single tokens), and
seeded weights (Linear ~ N(0, 1/fan_in), norms ~1) so that outputs differ clearly per text.

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

    python scripts/make_decoder_test_models.py OUT_DIR [--variant NAME] [--seed N]
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


def _config(variant: str, vocab: int, special_ids: dict[str, int]):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(vocab_size=vocab, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                  num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                  intermediate_size=INTERMEDIATE, max_position_embeddings=MAX_POS,
                  rms_norm_eps=1e-6, torch_dtype="float32")
    if variant.startswith("qwen3"):
        eos = special_ids["<|endoftext|>"]
        return Qwen3Config(**common, head_dim=HEAD_DIM, rope_theta=1e6, bos_token_id=eos,
                           eos_token_id=eos, tie_word_embeddings=not variant.endswith("untied"))
    if variant.startswith("qwen2"):
        eos = special_ids["<|endoftext|>"]
        return Qwen2Config(**common, rope_theta=1e6, bos_token_id=eos, eos_token_id=eos,
                           tie_word_embeddings=False)
    if variant.startswith("mistral"):
        return MistralConfig(**common, rope_theta=1e4, sliding_window=4096,
                             bos_token_id=special_ids["<s>"], eos_token_id=special_ids["</s>"],
                             tie_word_embeddings=False)
    return LlamaConfig(**common, rope_theta=1e4, rope_scaling={"rope_type": "linear",
                                                               "factor": 2.0},
                       bos_token_id=special_ids["<s>"], eos_token_id=special_ids["</s>"],
                       tie_word_embeddings=False)


def _randomize(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + torch.randn(p.shape, generator=g) * 0.1)
            elif p.dim() == 2:
                std = 1.0 if "embed" in name else 1.0 / p.shape[1] ** 0.5
                p.copy_(torch.randn(p.shape, generator=g) * std)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _sentence_transformers_files(out: Path, pooling: str, prompts: dict[str, str] | None,
                                 max_len: int) -> None:
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
        {"word_embedding_dimension": HIDDEN, **modes, "include_prompt": True}, indent=2))
    (out / "sentence_bert_config.json").write_text(json.dumps(
        {"max_seq_length": max_len, "do_lower_case": False}))
    (out / "config_sentence_transformers.json").write_text(json.dumps(
        {"prompts": prompts or {}, "default_prompt_name": None, "similarity_fn_name": "cosine"},
        indent=2))


def build(out_dir: Path, variant: str = "qwen3-embedding", seed: int = 0) -> Path:
    """Write the folder of `variant` to ``out_dir`` and return it."""
    from transformers import AutoModel, AutoModelForCausalLM

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
    config = _config(variant, tok.get_vocab_size(), specials)
    torch.manual_seed(seed)
    cls = AutoModelForCausalLM if "reranker" in variant else AutoModel
    model = cls.from_config(config, torch_dtype=torch.float32, attn_implementation="eager")
    _randomize(model, seed)
    if "reranker" in variant:  # a smaller final norm keeps yes/no logits unsaturated
        with torch.no_grad():
            model.model.norm.weight.mul_(0.1)
    shard = "80KB" if variant.endswith("sharded") else "10GB"
    model.save_pretrained(str(out), max_shard_size=shard, safe_serialization=True)
    if "embedding" in variant:
        prompts = (QWEN3_PROMPTS if variant.startswith("qwen3") else
                   {"query": "Instruct: Given a web search query, retrieve relevant passages "
                             "that answer the query\nQuery: "})
        _sentence_transformers_files(out, "lasttoken", prompts, 8192)
    elif variant == "llama-mean":
        _sentence_transformers_files(out, "mean_tokens", None, 4096)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--variant", choices=VARIANTS, default="qwen3-embedding")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    print(build(args.out_dir, args.variant, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
