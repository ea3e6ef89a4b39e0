"""GLiNER uni-encoder span models: zero-shot entities of any labels (/v1/extract).

A checkpoint as the hub has it: `gliner_config.json` (with the backbone's `encoder_config`),
`model.safetensors` or `pytorch_model.bin`, and the backbone tokenizer with `<<ENT>>` and
`<<SEP>>` added. What `gliner` 0.2.29 computes, row by row:

1. The text is split into words (`\\w+(?:[-_]\\w+)*|\\S`, gliner's whitespace splitter); a row
   is the label prompt `<<ENT>> label <<ENT>> label ... <<SEP>>` followed by the words, all
   tokenized as pre-split words with the tokenizer's special tokens, cut at its
   `model_max_length`.
2. The encoder (DeBERTa-v2/v3 or BERT, `runtime/`) runs on the row; a projection follows
   when GLiNER's hidden size differs from the encoder's.
3. Label vectors: the hidden states at the `<<ENT>>` tokens (the token after, when
   `embed_ent_token` is false), through `prompt_rep_layer` (Linear 4h, ReLU, Linear).
   Word vectors: each word's first subword, then a bidirectional LSTM (`num_rnn_layers`).
4. Spans of 1..`max_width` words: markerV0, MLPs on the start and end words, concatenated,
   ReLU, an MLP (`marker`: one Linear, as numind/NuNER_Zero with `max_width` 1); a span's
   score for a label is sigmoid(span . label). `token_level` checkpoints score words, not
   spans, and decode start/end/inside probabilities instead (`gliner_token.py`).
5. Spans above `threshold` are kept greedily, best first: with `flat_ner` none may overlap
   one kept, else only one nested in it or holding it; the same span with a second label
   only with `multi_label`. Offsets are characters of the text. SIE's
   `merge_adjacent_entities` (its default for NeuML/gliner-bert-tiny) then joins touching
   entities of one label.

Long texts are read as SIE reads them (its issues #446-#451): in windows of at most
`max_len` words (and of a subword budget), each sharing 64 words with the one before, each a
row of its own; the spans found are moved to the text and merged (`merge_windows`). The
rows go through the engine's token-budget batches like any other family's; steps 3-5 run
after the encoder, on the rows' hidden states: the span MLP's first linear is applied per
word and its last folded into the label vectors (`_candidates`), so a span never meets an
h x 4h matrix, and only the spans above the threshold reach the (numpy) greedy decoding.

LoRA (`options.lora_id`): adapters made with peft on the GLiNER model (or its backbone alone)
adapt the backbone's linears per row of the shared batches, and gliner's own linears (the
projection and the prompt and span MLPs; not the LSTM) in the request's steps 3-4.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch import nn

from ..errors import InvalidRequest
from ..runtime.batch import PackedBatch
from ..runtime.deberta import DebertaConfig, DebertaEncoder
from ..runtime.device import Placement
from ..runtime.encoder import Encoder, EncoderConfig
from ..runtime.lora import ModelLora, head_linear, head_weights
from ..runtime.weights import load_state_dict, reading
from .base import BatchOutputs, EncoderModel, ExtractPlan, ModelInfo, ModelSpec, family
from .gliner_token import TokenScorer, token_spans

WORD = re.compile(r"\w+(?:[-_]\w+)*|\S")
MAX_WORD_CHARS = 256  # a longer word is read as pieces of this many characters (as SIE)
WINDOW_OVERLAP_WORDS = 64  # words a window shares with the one before (SIE's _word_window)
MAX_WINDOWS = 128  # windows of one text (SIE: more is INPUT_TOO_LONG)
SUBWORDS_PER_WORD = 8  # a window's subword budget per word of max_len (SIE)
MAX_SUBWORDS = {"deberta": 4096, "other": 8192}  # SIE's caps on a window's subwords
DEFAULT_THRESHOLD = 0.5  # SIE's GLiNER adapter defaults
MAX_PROMPT_TOKENS = 1024  # SIE's DEFAULT_MAX_PROMPT_TOKENS: the labels' tokens in a row
TOO_MANY_WINDOWS = (f"GLiNER reads a document in at most {MAX_WINDOWS} windows of words; split "
                    "this document into shorter items")  # SIE's item error (INPUT_TOO_LONG)
_ENCODER_PREFIX = "token_rep_layer.bert_layer.model."
_PROJECTION = "token_rep_layer.projection"
SPAN_MODES = ("markerV0", "marker", "token_level")  # gliner's span_rep_layer kinds read here

Word = tuple[str, int, int]


def words_of(text: str) -> list[Word]:
    """gliner's whitespace splitter, a word longer than MAX_WORD_CHARS in pieces (as SIE)."""
    out = []
    for m in WORD.finditer(text):
        start, end = m.span()
        for cut in range(start, end, MAX_WORD_CHARS):
            piece_end = min(cut + MAX_WORD_CHARS, end)
            out.append((text[cut:piece_end], cut, piece_end))
    return out


@dataclass(frozen=True)
class Window:
    first: int  # index of its first word
    last: int  # one past its last word
    overlap: int  # words shared with the window before (0 for the first)


def windows_of(counts: list[int], max_words: int, max_subwords: int) -> list[Window]:
    """Windows of at most `max_words` words and `max_subwords` subwords (a window always
    reads its first word), each after the first starting `min(64, half its words)` words
    before the end of the one before."""
    out: list[Window] = []
    start, overlap, n = 0, 0, len(counts)
    while True:
        end, used = start, 0
        while end < n and end - start < max_words and (end == start or used + counts[end] <= max_subwords):
            used += counts[end]
            end += 1
        out.append(Window(start, end, overlap))
        if end >= n:
            return out
        overlap = min(WINDOW_OVERLAP_WORDS, (end - start) // 2)
        start = end - overlap


def greedy_order(start: np.ndarray, end: np.ndarray, score: np.ndarray, flat: bool,
                 multi_label: bool) -> np.ndarray:
    """gliner's greedy search: candidates best first (ties in their given order), each kept
    unless it conflicts with one kept before; the kept ones' positions, in text order (by
    start; same start, best first). Ends are exclusive (word or character offsets alike).
    Conflicts: the same span again (unless `multi_label`); overlapping spans, unless
    (`flat` false) one holds the other."""
    order = np.argsort(-score, kind="stable")
    start, end = start[order], end[order]
    alive = np.ones(len(order), dtype=bool)
    kept = []
    at = 0
    while at < len(order):
        if not alive[at]:
            rest = np.flatnonzero(alive[at:])
            if not len(rest):
                break
            at += int(rest[0])
        kept.append(at)
        s0, e0 = start[at], end[at]
        s, e = start[at + 1:], end[at + 1:]
        clash = (s < e0) & (s0 < e)
        if not flat:
            clash &= ~(((s0 <= s) & (e <= e0)) | ((s <= s0) & (e0 <= e)))
        same = (s == s0) & (e == e0)
        clash = np.where(same, not multi_label, clash)
        alive[at + 1:] &= ~clash
        at += 1
    kept_at = np.asarray(kept, dtype=np.int64)
    return order[kept_at[np.argsort(start[kept_at], kind="stable")]]


def greedy(spans: list[dict], flat: bool, multi_label: bool) -> list[dict]:
    """`greedy_order` on span dicts (`start`, `end`, `score`)."""
    if not spans:
        return []
    field = lambda k, t: np.fromiter((x[k] for x in spans), dtype=t, count=len(spans))  # noqa: E731
    keep = greedy_order(field("start", np.int64), field("end", np.int64),
                        field("score", np.float64), flat, multi_label)
    return [spans[i] for i in keep]


def merge_windows(found: list[list[dict]], edges: list[tuple[int, int]], flat: bool,
                  multi_label: bool) -> list[dict]:
    """One text's spans from its windows' (char offsets in the text; `edges` each window's
    first and last character). A span touching a window's edge that the next (or previous)
    window reads whole, where that window found an overlapping span of the label, may be cut
    short and is dropped; the same span twice keeps its best score; then `greedy` as in one
    window."""
    if len(found) == 1:
        return found[0]
    best: dict[tuple[int, int, str], dict] = {}
    for i, spans in enumerate(found):
        for span in spans:
            near = ([i - 1] if i > 0 and span["start"] <= edges[i][0] else []) + \
                ([i + 1] if i + 1 < len(found) and span["end"] >= edges[i][1] else [])
            if any(edges[j][0] <= span["start"] and span["end"] <= edges[j][1] and any(
                    o["label"] == span["label"] and o["start"] < span["end"]
                    and span["start"] < o["end"] for o in found[j]) for j in near):
                continue
            key = (span["start"], span["end"], span["label"])
            if key not in best or span["score"] > best[key]["score"]:
                best[key] = span
    return greedy(list(best.values()), flat, multi_label)


def merge_adjacent(entities: list[dict], text: str) -> list[dict]:
    """SIE's `merge_adjacent_entities`: entities of one label that touch (at most one character
    apart), in text order, become one, with the best score (for token-level checkpoints)."""
    merged: list[dict] = []
    for e in sorted(entities, key=lambda x: x["start"]):
        last = merged[-1] if merged else None
        if last is not None and last["label"] == e["label"] and e["start"] <= last["end"] + 1:
            end = max(last["end"], e["end"])
            merged[-1] = {**last, "end": end, "text": text[last["start"]:end],
                          "score": max(last["score"], e["score"])}
        else:
            merged.append(e)
    return merged


class Mlp(nn.Module):
    """gliner's projection layer: Linear(d, 4 o), ReLU, Linear(4 o, o) (names 0 and 3); an
    adapter's `heads` may hold LoRA pairs for either linear (by module name)."""

    def __init__(self, weights: dict[str, torch.Tensor], prefix: str) -> None:
        super().__init__()
        self.prefix = prefix
        self.w0, self.b0 = weights[f"{prefix}.0.weight"], weights[f"{prefix}.0.bias"]
        self.w3, self.b3 = weights[f"{prefix}.3.weight"], weights[f"{prefix}.3.bias"]

    def forward(self, x: torch.Tensor,
                heads: dict[str, dict[str, torch.Tensor]] | None = None) -> torch.Tensor:
        heads = heads or {}
        x = F.relu(head_linear(x, self.w0, self.b0, heads.get(f"{self.prefix}.0")))
        return head_linear(x, self.w3, self.b3, heads.get(f"{self.prefix}.3"))

    def weights(self, heads: dict[str, dict[str, torch.Tensor]]) -> tuple[tuple, tuple]:
        """(weight, bias) of its two linears, an adapter's pairs merged in."""
        return (head_weights(self.w0, self.b0, heads.get(f"{self.prefix}.0")),
                head_weights(self.w3, self.b3, heads.get(f"{self.prefix}.3")))

    def lora_heads(self) -> dict[str, tuple[int, int]]:
        """Its linears' (fan-in, fan-out) by module name (runtime/lora.py's layout heads)."""
        return {f"{self.prefix}.{i}": (w.shape[1], w.shape[0]) for i, w in ((0, self.w0), (3, self.w3))}


class HeadLinear(nn.Module):
    """One of gliner's linears by module name (`marker`'s output projection), with the
    adapter's LoRA pair for it if `heads` has one."""

    def __init__(self, weights: dict[str, torch.Tensor], prefix: str) -> None:
        super().__init__()
        self.prefix = prefix
        self.w, self.b = weights[f"{prefix}.weight"], weights[f"{prefix}.bias"]

    def forward(self, x: torch.Tensor,
                heads: dict[str, dict[str, torch.Tensor]] | None = None) -> torch.Tensor:
        return head_linear(x, self.w, self.b, (heads or {}).get(self.prefix))

    def weights(self, heads: dict[str, dict[str, torch.Tensor]]) -> tuple:
        """(weight, bias), an adapter's pair merged in."""
        return head_weights(self.w, self.b, heads.get(self.prefix))

    def lora_heads(self) -> dict[str, tuple[int, int]]:
        return {self.prefix: (self.w.shape[1], self.w.shape[0])}


@dataclass
class _Row:
    item: int
    words: list[Word]  # the window's words (offsets in the item's text)
    window: Window


@family("gliner")
class GLiNER(EncoderModel):
    output_types = ()  # does not encode
    extracts = "entities"

    def __init__(self, spec: ModelSpec, folder: Path, placement: Placement) -> None:
        self.spec, self.folder, self.placement = spec, folder, placement
        self.config = cfg = self.read_config(folder)
        self.span_mode = cfg.get("span_mode", "markerV0")
        if self.span_mode not in SPAN_MODES or cfg.get("represent_spans"):
            raise ValueError(f"{folder}: span_mode {self.span_mode!r}; supported: "
                             f"{', '.join(SPAN_MODES)} (without represent_spans)")
        if cfg.get("subtoken_pooling", "first") != "first" or cfg.get("post_fusion_schema"):
            raise ValueError(f"{folder}: only first-subtoken pooling without post-fusion layers "
                             "is supported")
        if cfg.get("words_splitter_type", "whitespace") != "whitespace":
            raise ValueError(f"{folder}: only gliner's whitespace word splitter is supported")
        weights = load_state_dict(folder)
        backbone = {k[len(_ENCODER_PREFIX):]: v for k, v in weights.items()
                    if k.startswith(_ENCODER_PREFIX)}
        enc_cfg = dict(cfg["encoder_config"])
        enc_cfg["vocab_size"] = backbone["embeddings.word_embeddings.weight"].shape[0]
        self.deberta = enc_cfg.get("model_type") in ("deberta-v2", "deberta")
        if self.deberta:
            encoder, _ = DebertaEncoder.from_weights(DebertaConfig.from_dict(enc_cfg), backbone)
        else:
            encoder, _ = Encoder.from_weights(EncoderConfig.from_dict(enc_cfg), backbone)
        self.encoder = encoder.to(placement.device, placement.dtype)
        self.extra_weights: dict[str, torch.Tensor] = {}
        # the heads run after the encoder, on the host, in float32
        head = {k: v.float() for k, v in weights.items() if not k.startswith(_ENCODER_PREFIX)}
        self.projection = (head[f"{_PROJECTION}.weight"], head[f"{_PROJECTION}.bias"]) \
            if f"{_PROJECTION}.weight" in head else None
        hidden = cfg["hidden_size"]
        self.lstm = None
        if cfg.get("num_rnn_layers", 0) > 0:
            self.lstm = nn.LSTM(hidden, hidden // 2, num_layers=cfg["num_rnn_layers"],
                                bidirectional=True, batch_first=True)
            self.lstm.load_state_dict({k[len("rnn.lstm."):]: v for k, v in head.items()
                                       if k.startswith("rnn.lstm.")})
            self.lstm.eval()
        self._span_heads(head)
        self.max_width = cfg.get("max_width", 12)
        self.max_words = cfg.get("max_len", 384)
        self.class_token = cfg["class_token_index"]
        self.embed_ent_token = cfg.get("embed_ent_token", True)
        self.ent_token, self.sep_token = cfg.get("ent_token", "[ENT]"), cfg.get("sep_token", "[SEP]")
        self.tokenizer = self._tokenizer(folder)
        self.word_tokenizer = Tokenizer.from_str(self.tokenizer.to_str())
        self.word_tokenizer.no_truncation()
        self.max_tokens = self.encoder.cfg.max_tokens
        self.max_subwords = min(SUBWORDS_PER_WORD * self.max_words,
                                MAX_SUBWORDS["deberta" if self.deberta else "other"])
        if not self.deberta:  # absolute positions: the window stays inside the table
            self.max_subwords = min(self.max_subwords, self.encoder.cfg.max_tokens - 4)

    def _span_heads(self, head: dict[str, torch.Tensor]) -> None:
        """The heads after the word vectors: gliner's `Scorer` (token_level), or the span
        markers' MLPs and the label projection (markerV0; `marker`'s output is one Linear)."""
        if self.span_mode == "token_level":
            self.scorer = TokenScorer(head)
            self.adaptable: tuple[Mlp | HeadLinear, ...] = ()  # the scorer takes no LoRA here
            return
        marker = "span_rep_layer.span_rep_layer"
        self.start_mlp, self.end_mlp = Mlp(head, f"{marker}.project_start"), Mlp(head, f"{marker}.project_end")
        out = f"{marker}.out_project"
        self.out_mlp = Mlp(head, out) if self.span_mode == "markerV0" else HeadLinear(head, out)
        self.prompt_mlp = Mlp(head, "prompt_rep_layer")
        self.adaptable = (self.prompt_mlp, self.start_mlp, self.end_mlp, self.out_mlp)

    @staticmethod
    def read_config(folder: Path) -> dict:
        path = folder / "gliner_config.json"
        with reading(path):
            return json.loads(path.read_text())

    @staticmethod
    def _tokenizer(folder: Path) -> Tokenizer:
        """The backbone tokenizer, cut at its `model_max_length` as gliner's call cuts it."""
        path = folder / "tokenizer.json"
        if not path.exists():
            raise FileNotFoundError(
                f"{folder} has no tokenizer.json: put the backbone's tokenizer (with <<ENT>> and "
                "<<SEP>> added, as gliner saves it) beside gliner_config.json")
        tok = Tokenizer.from_file(str(path))
        limit = None
        config = folder / "tokenizer_config.json"
        if config.exists():
            limit = json.loads(config.read_text()).get("model_max_length")
        tok.no_padding()
        if isinstance(limit, int) and limit < 1_000_000:
            tok.enable_truncation(limit)
        else:
            tok.no_truncation()
        return tok

    @classmethod
    def describe(cls, spec: ModelSpec, folder: Path) -> ModelInfo:
        return ModelInfo(spec.name, spec.family, (), {}, cls.read_config(folder).get("max_len"))

    @property
    def lora_config(self) -> ModelLora:
        """LoRA on the backbone's linears (under gliner's module path) and on gliner's own: the
        projection, the prompt and span MLPs (the LSTM is no linear)."""
        heads = {k: v for mlp in self.adaptable for k, v in mlp.lora_heads().items()}
        if self.projection is not None:
            w = self.projection[0]
            heads[_PROJECTION] = (w.shape[1], w.shape[0])
        return ModelLora(self.encoder.cfg, heads, _ENCODER_PREFIX)

    def dims(self) -> dict[str, int]:
        return {}

    # ------------------------------------------------------------------ before the encoder

    def prepare_extract(self, texts: list[str], labels: list[str], options: Any) -> ExtractPlan:
        """Rows: each text's windows. A text needing more than MAX_WINDOWS windows is not read;
        its item gets SIE's INPUT_TOO_LONG item error. The input tokens are SIE's: each text's
        subwords once (a window after the first counts neither the words it shares with the
        one before nor its special tokens), the first window's special tokens, no prompt."""
        if not labels:
            raise InvalidRequest("params.labels: GLiNER requires labels parameter for extraction")
        labels = list(dict.fromkeys(labels))  # gliner drops repeated labels
        prompt = [w for label in labels for w in ([self.ent_token, label] if label else [self.ent_token])]
        prompt.append(self.sep_token)
        if not all(text.strip() for text in texts):
            i = next(i for i, text in enumerate(texts) if not text.strip())
            raise InvalidRequest(f"items[{i}].text: GLiNER requires non-blank text for "
                                 "extraction")
        rows: list[_Row] = []
        too_long: set[int] = set()
        step = self.max_words - min(WINDOW_OVERLAP_WORDS, self.max_words // 2)
        for i, text in enumerate(texts):
            words = words_of(text)
            if len(words) > self.max_words + step * (MAX_WINDOWS - 1):  # before any tokenizing
                too_long.add(i)
                continue
            windows = windows_of(self._subwords([w for w, _, _ in words]), self.max_words,
                                 self.max_subwords)
            if len(windows) > MAX_WINDOWS:
                too_long.add(i)
                continue
            rows += [_Row(i, words[w.first:w.last], w) for w in windows]
        encodings = self.tokenizer.encode_batch([prompt + [w for w, _, _ in r.words] for r in rows],
                                                is_pretokenized=True)
        sample = encodings[0] if encodings else self.tokenizer.encode(prompt, is_pretokenized=True)
        prompt_tokens = len(self._prompt_tokens(sample.word_ids, len(prompt)))
        if prompt_tokens > MAX_PROMPT_TOKENS:
            raise InvalidRequest(f"params.labels: GLiNER labels take {prompt_tokens} tokens; a "
                                 f"request may use at most {MAX_PROMPT_TOKENS} tokens for them")
        ids = [np.asarray(e.ids, dtype=np.int64) for e in encodings]
        starts = [self._word_starts(e.word_ids, len(prompt), len(r.words))
                  for e, r in zip(encodings, rows)]
        if any(first[0] < 0 for first in starts):  # the cut left no word of the text
            raise InvalidRequest("params.labels: GLiNER label prompt leaves no document tokens "
                                 "for extraction")
        threshold = float(options.threshold if options.threshold is not None
                          else self.spec.extract_threshold or DEFAULT_THRESHOLD)
        flat = True if options.flat_ner is None else options.flat_ner
        multi = bool(options.multi_label)
        merge = self.spec.merge_adjacent_entities if options.merge_adjacent_entities is None \
            else options.merge_adjacent_entities
        heads = options.adapter.heads if options.adapter is not None else {}
        tokens = sum(self._input_tokens(e.word_ids, len(prompt), r.window)
                     for e, r in zip(encodings, rows))

        def finish(results: list) -> tuple[list[dict], int]:
            found: list[list[list[dict]]] = [[] for _ in texts]
            edges: list[list[tuple[int, int]]] = [[] for _ in texts]
            states = [torch.from_numpy(result.multivector).float() for result in results]
            marks = [np.flatnonzero(np.asarray(e.ids) == self.class_token) for e in encodings]
            for row, spans in zip(rows, self._spans(states, marks, starts, rows, labels,
                                                    threshold, flat, multi, heads)):
                for s in spans:
                    s["text"] = texts[row.item][s["start"]:s["end"]]
                found[row.item].append(spans)
                edges[row.item].append((row.words[0][1], row.words[-1][2]))
            out = []
            for i, text in enumerate(texts):
                if i in too_long:
                    out.append({"entities": [], "error": {"code": "INPUT_TOO_LONG",
                                                          "message": TOO_MANY_WINDOWS}})
                    continue
                entities = merge_windows(found[i], edges[i], flat, multi)
                out.append({"entities": merge_adjacent(entities, text) if merge else entities})
            return out, tokens

        return ExtractPlan(ids, frozenset({"multivector"}), finish)

    @staticmethod
    def _input_tokens(word_ids: list[int | None], prompt_words: int, window: Window) -> int:
        """A row's billed tokens (SIE's GLiNER `_meter`): its text's subwords past the words
        shared with the window before, and, in a text's first window, the special tokens."""
        if window.first == 0:
            return sum(w is None or w >= prompt_words for w in word_ids)
        return sum(w is not None and w >= prompt_words + window.overlap for w in word_ids)

    def _subwords(self, words: list[str]) -> list[int]:
        """Subword tokens of each word, as the tokenizer reads split words."""
        if not words:
            return []
        enc = self.word_tokenizer.encode(words, is_pretokenized=True, add_special_tokens=False)
        counts = np.bincount([w for w in enc.word_ids if w is not None], minlength=len(words))
        return counts.tolist()

    @staticmethod
    def _prompt_tokens(word_ids: list[int | None], prompt_words: int) -> list[int]:
        return [t for t, w in enumerate(word_ids) if w is not None and w < prompt_words]

    @staticmethod
    def _word_starts(word_ids: list[int | None], prompt_words: int, n_words: int) -> np.ndarray:
        """Token position of each text word's first subword; -1 for a word cut off."""
        first = np.full(n_words, -1, dtype=np.int64)
        previous = None
        for t, w in enumerate(word_ids):
            if w is not None and w != previous and w >= prompt_words:
                first[w - prompt_words] = t
            previous = w
        return first

    # ------------------------------------------------------------------ after the encoder

    def heads(self, batch: PackedBatch, hidden: torch.Tensor, ids: torch.Tensor) -> BatchOutputs:
        """Every token's hidden state, for the span scoring after the batch (`_spans`)."""
        return BatchOutputs(multivector=(hidden, torch.from_numpy(batch.lengths), 0))

    @torch.inference_mode()
    def _spans(self, states: list[torch.Tensor], marks: list[np.ndarray],
               firsts: list[np.ndarray], rows: list[_Row], labels: list[str], threshold: float,
               flat: bool, multi_label: bool, heads: dict[str, dict[str, torch.Tensor]]
               ) -> list[list[dict]]:
        """Steps 3-5 on each of a request's rows (its hidden states, `<<ENT>>` positions and
        words' first subwords); `heads`: the request's adapter's LoRA pairs of gliner's
        linears. Row by row, so a text's entities do not depend on what else a request
        holds (matrix products of other shapes may round differently)."""
        out: list[list[dict]] = []
        weights = self._out_weights(heads) if self.span_mode != "token_level" else ()
        for hidden, mark, first, row in zip(states, marks, firsts, rows):
            label_vecs, words = self._vectors(hidden, mark, first, heads)
            if self.span_mode == "token_level":
                out.append(greedy([{"start": row.words[st][1], "end": row.words[ed][2],
                                    "label": labels[c], "score": score}
                                   for st, ed, c, score in token_spans(
                                       self.scorer(words, label_vecs), threshold)],
                                  flat, multi_label))
                continue
            st, ed, label, score = self._candidates(label_vecs, words, threshold, heads, weights)
            out.append([{"start": row.words[st[k]][1], "end": row.words[ed[k]][2],
                         "label": labels[label[k]], "score": float(score[k])}
                        for k in greedy_order(st, ed + 1, score, flat, multi_label).tolist()])
        return out

    def _vectors(self, hidden: torch.Tensor, marks: np.ndarray, first: np.ndarray,
                 heads: dict[str, dict[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """A row's label vectors (the `<<ENT>>` states, (C, h)) and word vectors (first
        subwords, through the LSTM; a word cut off reads zeros), (n, h). Only those states go
        through the projection."""
        seen = np.flatnonzero(first >= 0)
        picked = hidden[torch.from_numpy(np.concatenate(
            [marks + (0 if self.embed_ent_token else 1), first[seen]]))]
        if self.projection is not None:
            picked = head_linear(picked, *self.projection, heads.get(_PROJECTION))
        words = picked.new_zeros(len(first), picked.shape[1])
        words[torch.from_numpy(seen)] = picked[len(marks):]
        if self.lstm is not None:
            words = self.lstm(words[None])[0][0]
        return picked[:len(marks)], words

    def _out_weights(self, heads: dict[str, dict[str, torch.Tensor]]) -> tuple:
        """The span output layer's weights, an adapter's pairs merged in, its first linear
        split by the halves of its input: (start half, end half, bias), then markerV0's last
        linear (weight, bias)."""
        if self.span_mode == "markerV0":
            (w0, b0), last = self.out_mlp.weights(heads)
        else:
            (w0, b0), last = self.out_mlp.weights(heads), ()
        h = w0.shape[1] // 2
        return (w0[:, :h], w0[:, h:], b0, *last)

    def _candidates(self, label_vecs: torch.Tensor, words: torch.Tensor, threshold: float,
                    heads: dict[str, dict[str, torch.Tensor]], weights: tuple
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """A row's spans scoring above `threshold`: (first word, last word, label, score)
        arrays in gliner's order (by first word, width, label).

        gliner scores span (s, e) for label vector c as sigmoid(out(relu([start(s); end(e)])) . c),
        `out` an MLP (markerV0) or one linear (marker). Its first linear splits over the
        halves of its input, W [a; b] = Wa a + Wb b, so each word's halves are projected once,
        not once per span; its last linear folds into the label vectors, (W x + b) . c =
        x . (W^T c) + b . c, so each span meets C folded labels, not the h x 4h weights."""
        start = F.relu(self.start_mlp(words, heads))
        end = F.relu(self.end_mlp(words, heads))
        lab = self.prompt_mlp(label_vecs, heads)
        st, ed = self._span_index(len(words))
        if self.span_mode == "markerV0":
            w_start, w_end, b0, w3, b3 = weights
            first, last = start @ w_start.T, torch.addmm(b0, end, w_end.T)  # (n, 4h)
            logits = torch.addmm(lab @ b3, F.relu(first[st] + last[ed]), (lab @ w3).T)
        else:  # marker: one linear, both halves fold into the labels
            w_start, w_end, b0 = weights
            first = start @ (lab @ w_start).T  # (n, C)
            last = torch.addmm(lab @ b0, end, (lab @ w_end).T)
            logits = first[st] + last[ed]
        probs = torch.sigmoid(logits)
        which, label = torch.where(probs > threshold)
        at = which.numpy()
        return st[at], ed[at], label.numpy(), probs[which, label].numpy()

    def _span_index(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """First and last word of every span of 1..max_width words in n words, by first word
        then width."""
        st = np.repeat(np.arange(n), self.max_width)
        ed = st + np.tile(np.arange(self.max_width), n)
        keep = ed < n
        return st[keep], ed[keep]

