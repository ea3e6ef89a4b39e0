"""Build small random-weight CLIP and SigLIP checkpoints in the hub layout, for the tests.

No hub here, so parity is proven on models of the real architectures, saved by transformers'
`save_pretrained` exactly as the hub checkpoints are laid out:
- CLIP (as openai/clip-vit-base-patch32): `CLIPModel` (224 px images, 32 px patches, the
  legacy `eos_token_id` 2 of the openai configs), a byte-level BPE tokenizer trained here on
  the given texts and written through `CLIPTokenizerFast` (tokenizer.json, vocab.json,
  merges.txt), and `CLIPImageProcessor`'s preprocessor_config.json;
- SigLIP (as google/siglip-base-patch16-224): `SiglipModel` (224 px, 16 px patches), a
  SentencePiece unigram `spiece.model` trained here (pad 0, `</s>` 1, `<unk>` 2, as T5's),
  saved through `SiglipTokenizer` with `model_input_names: ["input_ids"]` as the hub's
  configs have it (no attention mask: SigLIP attends to its padding), and
  `SiglipImageProcessor`'s config.
Every parameter (LayerNorms and biases too) is perturbed, so no weight keeps its initial value.

    python scripts/make_clip_test_models.py OUT_DIR   # writes OUT_DIR/clip and OUT_DIR/siglip
"""

from __future__ import annotations

import io
import json
import sys
import tempfile
from pathlib import Path

import torch

HIDDEN = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
_CLIP_SPLIT = (r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|"""
               r"""[\p{N}]|[^\s\p{L}\p{N}]+""")


def _perturb(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def _clip_tokenizer(texts: list[str], folder: Path):
    """A CLIP-style byte-level BPE (lowercase, `</w>` word ends) trained on `texts`."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import CLIPTokenizerFast

    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_CLIP_SPLIT), "removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    bpe.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=800, end_of_word_suffix="</w>", show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    merges = [" ".join(m) if isinstance(m, list) else m
              for m in json.loads(bpe.to_str())["model"]["merges"]]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = alphabet + [c + "</w>" for c in alphabet]
    vocab += [m.replace(" ", "") for m in merges if m.replace(" ", "") not in vocab]
    vocab += ["<|startoftext|>", "<|endoftext|>"]  # the highest ids, as in CLIP's vocabulary
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
        tok = CLIPTokenizerFast(vocab_file=f"{tmp}/vocab.json", merges_file=f"{tmp}/merges.txt",
                                model_max_length=77)
    tok.save_pretrained(folder)
    return tok


def build_clip(folder: Path, texts: list[str], seed: int = 0, full_size: bool = False,
               legacy_eos: bool = True) -> Path:
    """`full_size`: openai/clip-vit-base-patch32's shape (ViT-B/32 and its 12-layer, 512-wide
    text tower; the small vocabulary aside), for the benchmark. `legacy_eos`: the openai
    configs' `eos_token_id` 2 (pooling at the highest id); else the tokenizer's real one."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    folder.mkdir(parents=True, exist_ok=True)
    tok = _clip_tokenizer(texts, folder)
    torch.manual_seed(seed)
    shape = {} if full_size else HIDDEN
    config = CLIPConfig(
        text_config=dict(**shape, vocab_size=len(tok), max_position_embeddings=77,
                         bos_token_id=0, pad_token_id=1,
                         eos_token_id=2 if legacy_eos else tok.eos_token_id),
        vision_config=dict(**shape, image_size=224, patch_size=32),
        projection_dim=512 if full_size else 32)
    model = CLIPModel(config).eval()
    _perturb(model, seed)
    model.save_pretrained(folder, safe_serialization=True)
    CLIPImageProcessor().save_pretrained(folder)
    return folder


def _spiece(texts: list[str]) -> bytes:
    import sentencepiece as spm

    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=out, vocab_size=600, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False,
        character_coverage=0.98, minloglevel=2)
    return out.getvalue()


def build_siglip(folder: Path, texts: list[str], seed: int = 1, image_size: int = 224,
                 patch_size: int = 16) -> Path:
    """`image_size` / `patch_size`: e.g. 62 / 14 for so400m-patch14-384's remainder pixels."""
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel, SiglipTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "spiece.model").write_bytes(_spiece(texts))
        # the hub's SigLIP tokenizer configs feed input_ids only: SigLIP attends to its padding
        tok = SiglipTokenizer(vocab_file=f"{tmp}/spiece.model", model_max_length=64,
                              model_input_names=["input_ids"])
        tok.save_pretrained(folder)
    torch.manual_seed(seed)
    config = SiglipConfig(
        text_config=dict(**HIDDEN, vocab_size=len(tok), max_position_embeddings=64),
        vision_config=dict(**HIDDEN, image_size=image_size, patch_size=patch_size))
    model = SiglipModel(config).eval()
    _perturb(model, seed)
    model.save_pretrained(folder, safe_serialization=True)
    SiglipImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(folder)
    return folder


def build(root: Path, texts: list[str]) -> dict[str, Path]:
    return {"clip": build_clip(root / "clip", texts), "siglip": build_siglip(root / "siglip", texts)}


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from texts import SHORT_TEXTS

    print(build(Path(sys.argv[1]), SHORT_TEXTS))
