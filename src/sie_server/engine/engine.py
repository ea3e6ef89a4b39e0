"""The in-process engine: validate, tokenize, queue, and wait for results. No HTTP here."""

from __future__ import annotations

import contextlib
import dataclasses
import string
import threading
import time
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from ..config import Settings
from ..errors import AdapterNotFound, InputTooLong, InvalidRequest, WordTooLong, shown
from ..runtime.device import Placement, reuse_freed_memory
from ..runtime.images import ImageInput
from ..runtime.tokenizer import Tokenized, UnsettledWord
from ..models import FAMILIES
from .adapters import AdapterManager
from .extract import ExtractOptions
from ..metrics import Metrics
from .. import muvera
from .options import check_lengths, check_options
from .profiles import select
from .registry import ModelRegistry
from .request import ItemResult, Request, TimedFuture, Timing
from .scoring import ScoreOptions, ScoreResult, embedding_scores, pair_scores


@dataclass(frozen=True)
class EncodeOptions:
    truncate: bool = True
    is_query: bool = False
    instruction: str | None = None
    lora_id: str | None = None
    timeout_s: float | None = None  # deadline, counted from submission
    # SIE's normalize: True L2-normalises dense vectors of a model that does not; False
    # skips the model's own L2 step where its family can (EncoderModel.raw_vectors: BGE-M3's
    # dense and multivector, sentence-transformers' Normalize; ColBERT, CLIP and SigLIP
    # normalise regardless, as in SIE); None: the profile's, else the model's own output.
    normalize: bool | None = None
    # SIE's per-request templates (`{text}`, `{instruction}`), which replace the model's
    # prefix and instruction template; used by the families SIE's adapters use them in
    # (EncoderModel.templates: sentence-transformers, SPLADE), ignored by the others, as SIE.
    query_template: str | None = None
    doc_template: str | None = None
    # SIE's per-request token limits, below the model's (EncoderModel.length_options: SPLADE
    # and ColBERT documents max_seq_length, ColBERT queries query_max_length); ignored by
    # the other families, as SIE's adapters ignore them.
    max_seq_length: int | None = None
    query_max_length: int | None = None
    # SIE's per-request pooling (cls, mean, last; also sentence-transformers' names): the
    # sentence-transformers families pool these rows so (EncoderModel.poolings); the others
    # refuse any but their own (SIE's adapters for them ignore it).
    pooling: str | None = None
    # SIE's default_instruction: the instruction of a query sent without one (a request's
    # instruction, even "", wins), in the families that take templates; never for documents.
    default_instruction: str | None = None
    # MUVERA: the dense output is the encoding of the multivector; these settings override
    # the model's (muvera.py). None: off.
    muvera: dict[str, Any] | None = None

    @classmethod
    def parse(cls, options: dict[str, Any] | None) -> "EncodeOptions":
        """Validate a request's options dict; errors name the offending field."""
        kinds = {"truncate": bool, "is_query": bool, "instruction": str, "lora_id": str,
                 "timeout_s": (int, float), "muvera": dict, "normalize": bool,
                 "query_template": str, "doc_template": str, "max_seq_length": int,
                 "query_max_length": int, "pooling": str, "default_instruction": str}
        options = check_options(check_lengths(options, "params.options"), kinds,
                                "params.options")
        return cls(**{k: v for k, v in options.items() if v is not None})


class Engine:
    """Serves encode requests for every registered model; thread-safe."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or Settings()
        self.placement = Placement.resolve(self.settings.device, self.settings.dtype)
        if self.placement.device.type == "cpu":
            reuse_freed_memory()
        self.metrics = Metrics()
        self.registry = ModelRegistry(self.settings, self.placement, self.metrics)
        self._adapter_lock = threading.Lock()  # creating a model's AdapterManager
        # turns finished score requests into scores, off the schedulers' worker threads
        self._post = ThreadPoolExecutor(max_workers=2, thread_name_prefix="sie-post")

    def start(self) -> None:
        """Load the default models (blocking)."""
        for name in self.registry.defaults:
            self.registry.get(name)

    def close(self) -> None:
        """Finish everything queued, then stop the workers."""
        self.registry.close()
        self._post.shutdown(wait=True)

    def submit(self, model: str, texts: Sequence[str | ImageInput],
               output_types: Sequence[str] | None = None,
               options: dict[str, Any] | EncodeOptions | None = None, *,
               tenant: str | None = None) -> Future:
        """Queue items for encoding: texts, and for image models also images (ImageInput);
        the future resolves to one ItemResult per item, in order, and carries the request's
        `timing`. `tenant` (e.g. the caller's API key id) groups requests for fair scheduling."""
        timing = Timing()
        model, profile, runtime, options = self._profile(model, options)
        defaults = {k: runtime[k] for k in ("is_query", "muvera", *_EMBEDDING_DEFAULTS)
                    if k in runtime}
        opts = EncodeOptions.parse({**defaults, **options})
        normalize = opts.normalize if opts.normalize is not None else runtime.get("normalize")
        # SIE: a profile's output types replace the request's (core/encode_pipeline.py)
        types = list(runtime.get("output_types") or output_types or ["dense"])
        with self.registry.use(model) as handle:
            m = handle.model
            fde = None
            if opts.muvera is not None:
                fde = self._muvera(m, opts.muvera, opts.is_query, types)
                types = list(dict.fromkeys("multivector" if t == "dense" else t for t in types))
            m.check_output_types(types)
            pooling = _pooling(m, opts.pooling, "params.options.pooling" if "pooling" in options
                               else f"profile {profile!r}: pooling")
            normalizes = getattr(m, "normalize", True)
            if not texts:
                raise InvalidRequest("items must hold at least one item")
            with self._adapter(handle, opts.lora_id) as slot:
                started = time.perf_counter()
                limit = _limit(m, opts, opts.is_query)
                tok = self._prepare(m, list(texts), opts.is_query,
                                    _instruction(m, opts, opts.is_query),
                                    template=_template(m, opts, opts.is_query), limit=limit)
                timing.tokenization_s = time.perf_counter() - started
                self.metrics.tokenize_seconds.labels(model).observe(timing.tokenization_s)
                self._check_lengths(model, _most(m, limit), tok.original_lengths,
                                    opts.truncate)
                deadline = time.monotonic() + opts.timeout_s if opts.timeout_s else None
                request = Request(tok.ids, tok.original_lengths, frozenset(types), slot, deadline,
                                  tenant=tenant, raw=normalize is False and m.raw_vectors,
                                  pooling=pooling, future=TimedFuture(timing))
                self._enqueue(handle, request)
            post = fde
            # the request's normalize: true (also a MUVERA encoding), a profile's on a model
            # whose pipeline does not normalise
            if opts.normalize or (normalize and not normalizes):
                post = normalized if fde is None else (lambda results: normalized(fde(results)))
            return request.future if post is None else self._then(request.future, post)

    @staticmethod
    def _muvera(m, overrides: dict[str, Any], is_query: bool,
                types: list[str]) -> Callable[[list[ItemResult]], list[ItemResult]]:
        """What turns results into MUVERA results: the dense output becomes the encoding of
        the multivector (settings: the model's, then the request's), which stays only if it
        was asked for too."""
        field = "params.options.muvera"
        if "multivector" not in m.output_types:
            raise InvalidRequest(f"{field}: {m.spec.name} has no multivector output to encode")
        config = muvera.MuveraConfig.parse({**(m.spec.muvera or {}), **overrides}, field)
        config.check(m.dims()["multivector"], field)
        dense, keep = "dense" in types, "multivector" in types

        def finish(results: list[ItemResult]) -> list[ItemResult]:
            for r in results:
                if dense:
                    r.dense = muvera.encode(r.multivector, config, is_query)
                if not keep:
                    r.multivector = None
            return results

        return finish

    def encode(self, model: str, texts: Sequence[str], output_types: Sequence[str] | None = None,
               options: dict[str, Any] | EncodeOptions | None = None) -> list[ItemResult]:
        """Blocking encode."""
        return self.submit(model, texts, output_types, options).result()

    def submit_score(self, model: str, query: str, texts: Sequence[str],
                     options: dict[str, Any] | ScoreOptions | None = None,
                     top_k: int | None = None, *, tenant: str | None = None) -> Future:
        """Queue the scoring of `texts` against `query`; the future resolves to a ScoreResult.

        A cross-encoder runs one (query, item) pair per item; BGE-M3 encodes the query once and
        every item, and compares them. Either way the sequences are scheduled like encode items
        (token-budget batches, shared with other requests). The future carries `timing`."""
        timing = Timing()
        model, profile, runtime, options = self._profile(model, options)
        defaults = {k: runtime[k] for k in ("normalize", *_EMBEDDING_DEFAULTS) if k in runtime}
        opts = ScoreOptions.parse({**defaults, **options})
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int)
                                  or top_k < 1):
            raise InvalidRequest("top_k must be a positive integer")
        if not isinstance(query, (str, ImageInput)):
            raise InvalidRequest("query.text must be a string")
        if not texts:
            raise InvalidRequest("items must hold at least one item")
        with self.registry.use(model) as handle:
            m = handle.model
            if not m.score_types and m.extracts:
                raise InvalidRequest(f"{model} ({m.spec.family}) cannot score; it extracts: use "
                                     "/v1/extract")
            if not m.score_types:
                raise InvalidRequest(
                    f"{model} ({m.spec.family}) cannot score: scoring needs a cross-encoder or a "
                    f"model with its own scores (BGE-M3); use /v1/encode for {model}")
            mode = opts.check(model, m.score_types, m.pair_scoring)
            deadline = time.monotonic() + opts.timeout_s if opts.timeout_s else None
            with self._adapter(handle, opts.lora_id) as slot:
                started = time.perf_counter()
                pooling = _pooling(m, opts.pooling, "options.pooling" if "pooling" in options
                                   else f"profile {profile!r}: pooling")
                request, finish = self._score_request(m, model, query, texts, opts, top_k,
                                                      mode, slot, deadline, pooling)
                timing.tokenization_s = time.perf_counter() - started
                request.tenant, request.future = tenant, TimedFuture(timing)
                self._enqueue(handle, request)
            return self._then(request.future, finish)

    def _profile(self, ref: str, options: dict[str, Any] | EncodeOptions | ScoreOptions | None
                 ) -> tuple[str, str, dict[str, Any], dict[str, Any]]:
        """(model, profile, the profile's runtime defaults, the request's options as a dict)
        for `ref` (`model` or `model:profile`) and `options.profile` (engine/profiles.py)."""
        if isinstance(options, (EncodeOptions, ScoreOptions)):
            options = {f.name: getattr(options, f.name) for f in dataclasses.fields(options)
                       if getattr(options, f.name) != f.default}
        return select(ref, self.registry.profiles(), options)

    def _score_request(self, m, model: str, query: str, texts: Sequence[str], opts: ScoreOptions,
                       top_k: int | None, mode: str, slot: int, deadline: float | None,
                       pooling: str | None):
        """The Request of a score call and the function turning its results into scores. An
        embedder encodes the query and the items as encode does with the same options."""
        if m.pair_scoring:
            self._check_images(m, [query], "query")
            self._check_images(m, list(texts))
            limit = _limit(m, opts, False)
            most = _most(m, limit)
            with _whole_words("items[{i}]"):
                fixed, tok = m.prepare_pairs(query, list(texts), opts.instruction, limit)
            if fixed >= most:
                raise InputTooLong(f"query.text takes {fixed}+ tokens with the pair's special "
                                   f"tokens; {model} takes at most {most} per pair, "
                                   "which leaves no room for the item")
            self._check_lengths(model, most, tok.original_lengths, opts.truncate)
            request = Request(tok.ids, tok.original_lengths, frozenset({"score"}), slot,
                              deadline, token_types=tok.type_ids)
            activation = opts.activation or m.default_activation
            finish = lambda results: pair_scores(results, activation, top_k)  # noqa: E731
        else:
            outputs = opts.outputs(mode)  # SIE: an output weighted 0 is not computed
            q_limit, d_limit = _limit(m, opts, True), _limit(m, opts, False)
            q = self._prepare(m, [query], True, _instruction(m, opts, True), "query",
                              template=_template(m, opts, True, "options"), limit=q_limit)
            d = self._prepare(m, list(texts), False,
                              opts.instruction if m.instructs_score_items else None,
                              template=_template(m, opts, False, "options"), limit=d_limit)
            self._check_lengths(model, _most(m, q_limit), q.original_lengths, opts.truncate,
                                "query.text")
            self._check_lengths(model, _most(m, d_limit), d.original_lengths, opts.truncate)
            request = Request(q.ids + d.ids, q.original_lengths + d.original_lengths,
                              frozenset(outputs), slot, deadline, pooling=pooling,
                              raw=opts.normalize is False and m.raw_vectors)
            post = opts.normalize and not getattr(m, "normalize", True)

            def finish(results: list[ItemResult]) -> ScoreResult:
                results = normalized(results) if post else results
                return embedding_scores(results[0], results[1:], mode, opts.weights, top_k)
        return request, finish

    def score(self, model: str, query: str, texts: Sequence[str],
              options: dict[str, Any] | ScoreOptions | None = None,
              top_k: int | None = None) -> ScoreResult:
        """Blocking score."""
        return self.submit_score(model, query, texts, options, top_k).result()

    def submit_extract(self, model: str, texts: Sequence[str], labels: Sequence[str] | None,
                       options: dict[str, Any] | ExtractOptions | None = None, *,
                       tenant: str | None = None) -> Future:
        """Queue an extraction (entities or classifications of `labels` in each text); the
        future resolves to (one dict per text, {"entities": [...]} or {"classifications":
        [...]}, the input tokens read). The model's rows (windows of a text, or
        text/hypothesis pairs) are scheduled like encode items, in the shared token-budget
        batches. A profile's (`model:profile`, `options.profile`) extract settings are the
        defaults, as in encode."""
        if isinstance(options, ExtractOptions):
            opts = options
        else:
            model, _, runtime, options = self._profile(model, options)
            defaults = {k: runtime[k] for k in _EXTRACT_DEFAULTS if k in runtime}
            opts = ExtractOptions.parse({**defaults, **options})
        handle = self.registry.handle(model)
        if handle is not None and not FAMILIES[handle.spec.family].extracts:
            raise InvalidRequest(f"Model '{model}' does not support extraction. Use an "
                                 "extraction model like GLiNER, GLiClass, or Florence-2.")
        if not texts:
            raise InvalidRequest("items must hold at least one item")
        with self.registry.use(model) as handle:
            m = handle.model
            with self._adapter(handle, opts.lora_id) as slot:
                if slot >= 0:
                    opts = dataclasses.replace(opts, adapter=m.adapter_manager.adapter(slot))
                plan = m.prepare_extract(list(texts), list(labels or []), opts)
                deadline = time.monotonic() + opts.timeout_s if opts.timeout_s else None
                request = Request(plan.rows, [len(r) for r in plan.rows], plan.output_types,
                                  slot, deadline, token_types=plan.type_ids, tenant=tenant)
                if plan.rows:
                    self._enqueue(handle, request)
                else:  # every item failed on its own (SIE's item errors): nothing to compute
                    if slot >= 0:
                        m.adapter_manager.release(slot)
                    request.future.set_result([])
        return self._then(request.future, plan.finish)

    def extract(self, model: str, texts: Sequence[str], labels: Sequence[str] | None,
                options: dict[str, Any] | ExtractOptions | None = None
                ) -> tuple[list[dict[str, Any]], int]:
        """Blocking extract."""
        return self.submit_extract(model, texts, labels, options).result()

    def tokenize(self, model: str, texts: Sequence[str], is_query: bool = False,
                 instruction: str | None = None) -> list[list[int]]:
        """The token ids `model` computes on for each text when encoding it with these options
        (prefix, instruction, truncation to its limit); nothing is queued."""
        with self.registry.use(model) as handle:
            tok = self._prepare(handle.model, list(texts), is_query, instruction)
        return [row.tolist() for row in tok.ids]

    def vocab(self, model: str, ids: Sequence[int]) -> list[tuple[str, str]]:
        """(the vocabulary's string, the token decoded alone) of each token id of `model`."""
        with self.registry.use(model) as handle:
            tokenizer = handle.model.tokenizer
        size = tokenizer.vocab_size
        for i, token_id in enumerate(ids):
            if not 0 <= token_id < size:
                raise InvalidRequest(f"ids[{i}]: {token_id} is not a token id of {model} "
                                     f"(0 to {size - 1})")
        return [(tokenizer.piece(t), tokenizer.decode([t])) for t in ids]

    @staticmethod
    def _check_images(m, items: list, field: str = "items[{i}]") -> list[int]:
        """Positions of the images among `items`; InvalidRequest if the model embeds none."""
        pics = [i for i, x in enumerate(items) if isinstance(x, ImageInput)]
        if pics and not m.embeds_images:
            raise InvalidRequest(f"{field.format(i=pics[0])}.images: {m.spec.name} "
                                 f"({m.spec.family}) does not embed images; it takes text")
        return pics

    def _prepare(self, m, items: list, is_query: bool, instruction: str | None,
                 field: str = "items[{i}]", template: str | None = None,
                 limit: int | None = None) -> Tokenized:
        """Tokenize the texts and preprocess the images of `items` (image rows become patch
        arrays, their length the number of patches), in item order."""
        pics = self._check_images(m, items, field)
        if not pics:
            with _whole_words(field):
                return m.prepare(items, is_query, instruction, template, limit)
        rows: list = [None] * len(items)
        lengths = [0] * len(items)
        texts = [i for i, x in enumerate(items) if not isinstance(x, ImageInput)]
        if texts:
            with _whole_words(field, texts):
                tok = m.prepare([items[i] for i in texts], is_query, instruction, template,
                                limit)
            for i, ids, n in zip(texts, tok.ids, tok.original_lengths):
                rows[i], lengths[i] = ids, n
        patches = m.prepare_images([items[i] for i in pics],
                                   [f"{field.format(i=i)}.images[0]" for i in pics])
        for i, p in zip(pics, patches):
            rows[i], lengths[i] = p, len(p)
        return Tokenized(rows, lengths)

    @staticmethod
    def _check_lengths(model: str, limit: int, lengths: list[int], truncate: bool,
                       field: str = "items[{i}].text") -> None:
        if truncate:
            return
        for i, n in enumerate(lengths):
            if n > limit:
                # n is exact up to the limit, a lower bound above it (the text is cut early)
                raise InputTooLong(f"{field.format(i=i)} has more than {limit} tokens; {model} "
                                   f"takes at most {limit} (set options.truncate to true to cut it)")

    def _then(self, inner: TimedFuture, fn: Callable[[Any], Any]) -> TimedFuture:
        """A future for fn(inner's result), computed on the post-processing pool (counted as
        post-processing in `timing`); cancelling it cancels `inner` (queued work is then
        dropped before compute)."""
        outer = TimedFuture(inner.timing)

        def run(value: Any) -> None:
            if outer.done():
                return
            try:
                result = fn(value)
                outer.timing.finished = time.monotonic()
            except Exception as exc:  # noqa: BLE001 - reported through the future
                with contextlib.suppress(InvalidStateError):
                    outer.set_exception(exc)
                return
            with contextlib.suppress(InvalidStateError):
                outer.set_result(result)

        def relay(f: Future) -> None:
            if f.cancelled():
                outer.cancel()
            elif f.exception() is not None:
                with contextlib.suppress(InvalidStateError):
                    outer.set_exception(f.exception())
            else:
                try:
                    self._post.submit(run, f.result())
                except RuntimeError:  # pool shut down: finish here
                    run(f.result())

        outer.add_done_callback(lambda f: f.cancelled() and inner.cancel())
        inner.add_done_callback(relay)
        return outer

    # ------------------------------------------------------------------ LoRA adapters

    def _adapters(self, handle) -> AdapterManager:
        """The adapter manager of a ready model handle, created on first use. It lives on the
        model object, so a model unloaded (or evicted) takes its adapters with it."""
        model = handle.model
        with self._adapter_lock:
            mgr = getattr(model, "adapter_manager", None)
            if mgr is None:
                registry = self.registry
                mgr = model.adapter_manager = AdapterManager(
                    model, self.settings, self.metrics,
                    reserve=lambda nbytes, what: registry.reserve_adapter(handle, model, nbytes, what),
                    release=lambda nbytes: registry.release_adapter(handle, model, nbytes))
            return mgr

    @contextlib.contextmanager
    def _adapter(self, handle, lora_id: str | None) -> Iterator[int]:
        """The slot of `lora_id` (loading it first, bounded by adapter_load_timeout_s), or -1
        for none, referenced for the request being built: `_enqueue` makes the reference last
        until the request resolves; if the request is never queued it is released here. So
        unloading or evicting the adapter never changes a queued request."""
        if lora_id is None:
            yield -1
            return
        mgr = self._adapters(handle)
        slot = mgr.acquire(lora_id)
        try:
            yield slot
        except BaseException:
            mgr.release(slot)
            raise

    def _enqueue(self, handle, request: Request) -> None:
        """Queue `request`; its adapter reference (if any) is released when it resolves."""
        request.timing.queued = request.enqueued_at = time.monotonic()
        handle.scheduler.submit(request)
        slot = request.adapter_slot
        if slot >= 0:
            mgr = handle.model.adapter_manager
            request.future.add_done_callback(lambda _f: mgr.release(slot))

    def load_adapter(self, model: str, lora_id: str) -> dict[str, Any]:
        """Preload an adapter (POST /v1/models/{model}/adapters/{lora_id})."""
        handle = self.registry.get(model)
        mgr = self._adapters(handle)
        mgr.ensure_loaded(lora_id)
        return next((a for a in mgr.list() if a["id"] == lora_id), {"id": lora_id})

    def unload_adapter(self, model: str, lora_id: str) -> dict[str, Any]:
        """Unload an adapter; requests already holding it finish with it."""
        handle = self.registry.get(model)
        out = self._adapters(handle).unload(lora_id)
        if out is None:
            raise AdapterNotFound(f"adapter {lora_id!r} is not loaded for {model}")
        return out

    def adapters(self, model: str) -> list[dict[str, Any]]:
        """Loaded (and loading) adapters of a model; never loads anything."""
        handle = next((h for h in self.registry.handles() if h.spec.name == model), None)
        mgr = getattr(handle.model, "adapter_manager", None) if handle is not None else None
        return [] if mgr is None else mgr.list()


def _limit(m, opts: EncodeOptions | ScoreOptions, is_query: bool) -> int | None:
    """The request's token limit for queries or documents where the model's family takes
    one (EncoderModel.length_options)."""
    key = "query_max_length" if is_query and "query_max_length" in m.length_options \
        else "max_seq_length"
    return getattr(opts, key) if key in m.length_options else None


def _most(m, limit: int | None) -> int:
    """The most tokens a text may take: the request's limit (None: none), at most the
    model's."""
    return min(limit or m.max_tokens, m.max_tokens)


# the options a profile sets for encode, and for score on an embedder
_EMBEDDING_DEFAULTS = ("lora_id", "instruction", "query_template", "doc_template", "pooling",
                       "default_instruction", "max_seq_length", "query_max_length")


# the options a profile sets for extract
_EXTRACT_DEFAULTS = ("lora_id", "instruction", "threshold", "flat_ner", "multi_label",
                     "hypothesis_template", "merge_adjacent_entities", "classification_type")


def _template(m, opts: EncodeOptions | ScoreOptions, is_query: bool,
              field: str = "params.options") -> str | None:
    """The request's template for queries or documents where the model's family takes one; a
    400 naming the option unless its only placeholders are {text} and {instruction}."""
    key = "query_template" if is_query else "doc_template"
    template = getattr(opts, key)
    if not template or not m.templates:  # "" is no template, as SIE's `if template:`
        return None
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
        template.format(text="", instruction="")
    except (KeyError, IndexError, ValueError, AttributeError) as exc:
        fields = {f"{type(exc).__name__}: {exc}"}
    bad = sorted(shown(f) for f in fields - {"text", "instruction"})
    if bad:
        raise InvalidRequest(f"{field}.{key} may hold the placeholders {{text}} and "
                             f"{{instruction}} only (found {', '.join(bad)})")
    return template


def _instruction(m, opts: EncodeOptions | ScoreOptions, is_query: bool) -> str | None:
    """The request's instruction; for a query sent without one, its `default_instruction`
    where the family takes templates (SIE's resolve_query_instruction)."""
    if opts.instruction is not None or not is_query or not m.templates:
        return opts.instruction
    return opts.default_instruction


# SIE's pooling names, and sentence-transformers', -> the pooling they mean
_POOLINGS = {"cls": "cls", "cls_token": "cls", "mean": "mean", "mean_tokens": "mean",
             "last": "last_token", "last_token": "last_token", "lasttoken": "last_token",
             "splade": "splade"}
_SIE_POOLINGS = ("cls", "mean", "last", "last_token", "splade")


def _pooling(m, asked: str | None, field: str) -> str | None:
    """The pooling these rows take where it is not the model's own (None: the model's): cls,
    mean or last_token (SPLADE's own is splade). A name SIE does not use, or another pooling
    on a model that cannot change it (EncoderModel.poolings), is a 400 naming `field`."""
    if asked is None:
        return None
    mode = _POOLINGS.get(asked)
    if mode is None:
        others = ", ".join(sorted(set(_POOLINGS) - set(_SIE_POOLINGS)))
        raise InvalidRequest(f"{field} must be one of {', '.join(_SIE_POOLINGS)} (SIE's names; "
                             f"also sentence-transformers' {others}), not '{shown(asked)}'")
    own = _POOLINGS.get(getattr(m, "pooling", None) or "")
    if mode == own:
        return None
    if not m.poolings:
        raise InvalidRequest(f"{field} '{shown(asked)}': {m.spec.name} pools by "
                             f"{own or 'its own rule'}, which only sentence-transformers "
                             "models change")
    return mode


def normalized(results: list[ItemResult]) -> list[ItemResult]:
    """Results whose dense vectors are L2-normalised (normalize: true, by request or profile)."""
    out = []
    for r in results:
        if r.dense is not None:
            norm = float(np.linalg.norm(r.dense))
            r = dataclasses.replace(r, dense=r.dense / norm if norm > 0 else r.dense)
        out.append(r)
    return out


@contextlib.contextmanager
def _whole_words(field: str, positions: list[int] | None = None) -> Iterator[None]:
    """The tokenizer's refusal of a huge word as a 413 naming the item (`positions`: the
    items' places, when only some were tokenized; a pair's first text is the query)."""
    try:
        yield
    except UnsettledWord as e:
        name = "query" if e.index is None else \
            field.format(i=positions[e.index] if positions else e.index)
        raise WordTooLong(f"{name}.text: {e}; SIE cannot cut it exactly without tokenizing "
                          "all of it, and refuses it rather than guess: break the word up "
                          "(with spaces) or send a shorter text") from None
