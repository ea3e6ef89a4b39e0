"""CLIP and SigLIP: texts and images embedded into one space (both towers, `dense` only).

Checkpoints are Hugging Face `CLIPModel` / `SiglipModel` folders (config.json with
`text_config` / `vision_config`, weights, `preprocessor_config.json`, and `tokenizer.json`
for CLIP or `spiece.model` for SigLIP). The vectors equal transformers'
`get_text_features` / `get_image_features` after L2 normalisation:
- CLIP text: causal attention, final LayerNorm, the hidden state at the end-of-text token
  (the highest token id when the config's `eos_token_id` is the legacy 2, else the first
  `eos_token_id`), `text_projection`;
- CLIP image: class token + patches, pre-LayerNorm, layers, post-LayerNorm on the class
  token, `visual_projection`;
- SigLIP text: every text padded to the tokenizer's 64 tokens (`padding="max_length"`, as
  SigLIP was trained), bidirectional attention, final LayerNorm, the last position, `head`;
- SigLIP image: patches, layers, post-LayerNorm, the attention-pooling head.
Images are decoded and preprocessed in the submitting thread (`prepare_images`); a batch's
images go through the vision tower together and its texts through the text tower.
LoRA (PEFT adapters of `CLIPModel` / `SiglipModel`): the q/k/v/out projections and fc1/fc2 of
either tower's layers and of SigLIP's pooling head (`attention.out_proj`, `mlp.fc1/fc2`),
per item: each tower's hook sees its own rows (text tokens; image tokens; SigLIP's head one
row per image) with the item's adapter (runtime/vit.py `TowersLora`).
"""

from __future__ import annotations

import abc
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InvalidRequest
from ..runtime.attention import make_attention
from ..runtime.batch import PackedBatch, positions
from ..runtime.device import Placement
from ..runtime.encoder import LinearHook
from ..runtime.images import (DECODE_SLOTS, ImageError, ImageInput, ImageProcessor, decode,
                              to_patches)
from ..runtime.spm_tokenizer import SiglipTextTokenizer
from ..runtime.tokenizer import TextTokenizer
from ..runtime.vit import TowerConfig, TowersLora, attention_pool, text_tower, vision_tower
from ..runtime.weights import load_state_dict
from .base import BatchOutputs, EncoderModel, ModelSpec, family

# transformers' config defaults (config.json leaves out the values equal to them)
_CLIP_TEXT = {"vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048,
              "num_hidden_layers": 12, "num_attention_heads": 8, "max_position_embeddings": 77,
              "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
_CLIP_VISION = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                "num_attention_heads": 12, "image_size": 224, "patch_size": 32,
                "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
_SIGLIP_TEXT = {"vocab_size": 32000, "hidden_size": 768, "intermediate_size": 3072,
                "num_hidden_layers": 12, "num_attention_heads": 12, "max_position_embeddings": 64,
                "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6}
_SIGLIP_VISION = {**_SIGLIP_TEXT, "image_size": 224, "patch_size": 16}


def first_max(keys: np.ndarray, cu: np.ndarray) -> np.ndarray:
    """Per sequence, the packed index of its first largest key (torch's argmax rule)."""
    lengths = np.diff(cu)
    seq = np.repeat(np.arange(len(lengths)), lengths)
    hits = np.flatnonzero(keys == np.maximum.reduceat(keys, cu[:-1])[seq])
    return hits[np.r_[True, seq[hits][1:] != seq[hits][:-1]]]


class ImageTextModel(EncoderModel):
    """What CLIP and SigLIP share: config, towers, preprocessing, the mixed forward."""

    output_types = ("dense",)
    score_types = ("dense",)
    embeds_images = True
    causal_text = False
    defaults: tuple[dict, dict]

    def __init__(self, spec: ModelSpec, folder: Path, placement: Placement) -> None:
        # not EncoderModel.__init__: that builds a BERT encoder
        self.spec, self.folder, self.placement = spec, folder, placement
        config = json.loads((folder / "config.json").read_text())
        # older hub configs keep values in `*_config_dict`, which override (as transformers reads)
        tower = lambda k: {**(config.get(f"{k}_config") or {}),  # noqa: E731
                           **(config.get(f"{k}_config_dict") or {})}
        self.text_config = tower("text")
        tcfg = TowerConfig.from_dict(self.text_config, self.defaults[0])
        vcfg = TowerConfig.from_dict(tower("vision"), self.defaults[1])
        state = load_state_dict(folder)
        modules = tuple(sorted({k.rpartition(".")[0] or k for k in state}))
        self.text = placement.place(text_tower(tcfg, state, "text_model."))
        self.vision = placement.place(vision_tower(vcfg, state, "vision_model."))
        self.load_heads(state)
        self._lora = TowersLora(tcfg, vcfg, hasattr(self, "pool"), modules)  # SigLIP: a head
        self.max_tokens = min(spec.max_input_tokens or tcfg.max_positions, tcfg.max_positions)
        self.processor = ImageProcessor.from_file(folder / "preprocessor_config.json")
        size = vcfg.image_size  # a non-square input shows whether the output size is fixed
        if self.processor.output_size(size, size + 1) != (size, size):
            raise ValueError(f"{folder}: preprocessor_config.json does not make "
                             f"{size} x {size} images, the vision tower's input size")

    @abc.abstractmethod
    def load_heads(self, state: dict[str, torch.Tensor]) -> None:
        """Take the family's poolings / projections (and tokenizer) from the remaining weights."""

    @abc.abstractmethod
    def text_features(self, ids: np.ndarray, cu: np.ndarray,
                      hook: LinearHook | None) -> torch.Tensor:
        """(texts, dim) unnormalised features of packed token ids."""

    @abc.abstractmethod
    def image_features(self, pixels: np.ndarray, hook: LinearHook | None,
                       head_hook: LinearHook | None) -> torch.Tensor:
        """(images, dim) unnormalised features of (images, patches, patch_dim) uint8 patches;
        `hook` sees every image token, `head_hook` one row per image."""

    @property
    def lora_config(self) -> TowersLora:
        return self._lora

    def _weight(self, state: dict[str, torch.Tensor], key: str) -> torch.Tensor:
        if key not in state:
            raise ValueError(f"weights in {self.folder} lack {key}")
        return state.pop(key).to(self.placement.device, self.placement.dtype)

    @property
    def memory_bytes(self) -> int:
        values = vars(self).values()
        modules = [m for m in values if isinstance(m, torch.nn.Module)]
        tensors = [*(p for m in modules for p in (*m.parameters(), *m.buffers())),
                   *(v for v in values if isinstance(v, torch.Tensor))]
        return sum(t.numel() * t.element_size() for t in tensors)

    def heads(self, batch: PackedBatch, hidden: torch.Tensor, ids: torch.Tensor) -> BatchOutputs:
        raise NotImplementedError("the two towers have their own forward()")

    def prepare_images(self, images: list[ImageInput], fields: list[str]) -> list[np.ndarray]:
        """Decode and preprocess images into patch rows; InvalidRequest names the field."""
        out = []
        for image, field in zip(images, fields):
            try:
                with DECODE_SLOTS:  # bounds the memory of concurrent decodes
                    pixels = self.processor(decode(image))
            except ImageError as exc:
                raise InvalidRequest(f"{field}: the image {exc}") from None
            out.append(to_patches(pixels, self.vision.cfg.patch_size))
        return out

    @torch.inference_mode()
    def forward(self, batch: PackedBatch) -> BatchOutputs:
        dev = self.placement.device
        out = torch.empty(batch.num_seqs, self.dims()["dense"], device=dev)
        images = batch.image_rows if batch.image_rows is not None else np.zeros(0, np.int64)
        texts = np.setdiff1d(np.arange(batch.num_seqs), images)
        if len(texts):  # image rows hold no tokens: the batch's hook sees the text tokens
            cu = np.r_[0, batch.cu_seqlens[1:][texts]]
            features = self.text_features(batch.input_ids, cu, self.adapter_hook(batch))
            out[torch.from_numpy(texts).to(dev)] = features.float()
        if len(images):
            hook = head_hook = None
            if (batch.adapter_slots[images] >= 0).any():
                hook = self.adapter_hook(_image_rows(batch, images, self.vision.seq))
                head_hook = self.adapter_hook(_image_rows(batch, images, 1))
            features = self.image_features(batch.pixels, hook, head_hook)
            out[torch.from_numpy(images).to(dev)] = features.float()
        return BatchOutputs(dense=F.normalize(out, dim=-1))

    def text_hidden(self, ids: np.ndarray, cu: np.ndarray,
                    hook: LinearHook | None) -> torch.Tensor:
        dev = self.placement.device
        attention = make_attention(cu, dev, self.placement.dtype, causal=self.causal_text)
        return self.text(torch.from_numpy(ids).to(dev, non_blocking=True),
                         torch.from_numpy(positions(cu, 0)).to(dev, non_blocking=True), attention,
                         hook)

    def vision_hidden(self, pixels: np.ndarray, hook: LinearHook | None) -> torch.Tensor:
        """(images, sequence, hidden) before the post-LayerNorm."""
        dev, dt = self.placement.device, self.placement.dtype
        n = pixels.shape[0]
        x = torch.from_numpy(pixels).to(dev, non_blocking=True).reshape(-1, pixels.shape[2])
        x = self.processor.normalize_patches(x, self.vision.cfg.patch_size).to(dt)
        cu = np.arange(n + 1, dtype=np.int64) * self.vision.seq
        return self.vision(x, make_attention(cu, dev, dt), hook)


def _image_rows(batch: PackedBatch, images: np.ndarray, per_image: int) -> PackedBatch:
    """The batch's image rows as sequences of `per_image` rows each, with their adapters: what
    the adapter hook of a vision-tower linear (or of SigLIP's head) sees."""
    return PackedBatch(np.zeros(0, np.int64), np.arange(len(images) + 1) * per_image, None,
                       batch.adapter_slots[images], batch.output_types)


@family("clip")
class Clip(ImageTextModel):
    causal_text = True
    defaults = (_CLIP_TEXT, _CLIP_VISION)

    def load_heads(self, state: dict[str, torch.Tensor]) -> None:
        self.text_proj = self._weight(state, "text_projection.weight")
        self.visual_proj = self._weight(state, "visual_projection.weight")
        self.eos_id = self.text_config.get("eos_token_id", 49407)
        self.tokenizer = TextTokenizer(self.folder / "tokenizer.json",
                                       self.text.cfg.max_positions)

    def dims(self) -> dict[str, int]:
        return {"dense": self.text_proj.shape[0]}

    def text_features(self, ids: np.ndarray, cu: np.ndarray,
                      hook: LinearHook | None) -> torch.Tensor:
        hidden = self.text_hidden(ids, cu, hook)
        # transformers: eos_token_id 2 is the legacy config: the highest id marks the end
        keys = ids if self.eos_id == 2 else (ids == self.eos_id).astype(np.int64)
        eos = torch.from_numpy(first_max(keys, cu)).to(hidden.device)
        return F.linear(hidden[eos], self.text_proj)

    def image_features(self, pixels: np.ndarray, hook: LinearHook | None,
                       head_hook: LinearHook | None) -> torch.Tensor:
        cls = self.vision.post_ln(self.vision_hidden(pixels, hook)[:, 0])
        return F.linear(cls, self.visual_proj)


@family("siglip")
class Siglip(ImageTextModel):
    defaults = (_SIGLIP_TEXT, _SIGLIP_VISION)

    def load_heads(self, state: dict[str, torch.Tensor]) -> None:
        self.text_head_w = self._weight(state, "text_model.head.weight")
        self.text_head_b = self._weight(state, "text_model.head.bias")
        vcfg = self.vision.cfg
        self.pool = attention_pool(vcfg, state, "vision_model.head.").to(
            self.placement.device, self.placement.dtype)
        self.tokenizer = SiglipTextTokenizer(self.folder, self.text.cfg.max_positions)

    def dims(self) -> dict[str, int]:
        return {"dense": self.text_head_w.shape[0]}

    def text_features(self, ids: np.ndarray, cu: np.ndarray,
                      hook: LinearHook | None) -> torch.Tensor:
        last = torch.from_numpy(cu[1:] - 1).to(self.placement.device)
        hidden = self.text_hidden(ids, cu, hook)[last]
        return F.linear(hidden, self.text_head_w, self.text_head_b)

    def image_features(self, pixels: np.ndarray, hook: LinearHook | None,
                       head_hook: LinearHook | None) -> torch.Tensor:
        return self.pool(self.vision.post_ln(self.vision_hidden(pixels, hook)), head_hook)
