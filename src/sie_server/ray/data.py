"""Ray Data: encode a text column of a Dataset with an Engine per actor.

`Embedder` is the callable class for `Dataset.map_batches(..., compute=ActorPoolStrategy())`:
each actor builds its own Engine (an Engine does not pickle) and appends the columns of
`columns.to_columns` (dense, sparse, multivector, any subset) to every batch.
`embed_dataset` wires it up; the corpus command's `--ray` backend calls it.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import pyarrow as pa
import ray.data

from ..columns import schema_for, to_columns
from ..config import Settings
from ..engine import EncodeOptions, Engine


def split_options(options: Mapping[str, Any] | None) -> tuple[EncodeOptions, str]:
    """encode's options (validated, errors name the field) and `output_dtype` apart."""
    rest = dict(options or {})
    output_dtype = rest.pop("output_dtype", None) or "float32"
    return EncodeOptions.parse(rest), output_dtype


class Embedder:
    """Appends `model`'s outputs for the texts in `text_column` to each pyarrow batch."""

    def __init__(self, model: str, output_types: Sequence[str] = ("dense",),
                 options: Mapping[str, Any] | None = None, settings: Settings | None = None,
                 text_column: str = "text") -> None:
        self.model, self.output_types, self.text_column = model, list(output_types), text_column
        self.options, self.output_dtype = split_options(options)
        self.engine = Engine(settings or Settings(default_models=[]))
        info = self.engine.registry.get(model).model.info  # load now, not in the first batch
        self.dims = {k: v for k, v in info.dims.items() if k in ("dense", "multivector")}
        schema_for(self.output_types, self.output_dtype, self.dims)  # bad types fail here

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self.text_column not in batch.column_names:
            raise ValueError(f"the dataset has no column {self.text_column!r} "
                             f"(columns: {', '.join(batch.column_names)})")
        texts = batch.column(self.text_column).to_pylist()
        if any(not isinstance(t, str) for t in texts):
            bad = next(i for i, t in enumerate(texts) if not isinstance(t, str))
            raise ValueError(f"column {self.text_column!r} row {bad} of this batch is not a "
                             f"string: {texts[bad]!r}")
        results = (self.engine.encode(self.model, texts, self.output_types, self.options)
                   if texts else [])
        for name, column in to_columns(results, self.output_types, self.output_dtype,
                                       self.dims).items():
            batch = batch.append_column(name, column)
        return batch


def embed_dataset(ds: ray.data.Dataset, model: str, output_types: Sequence[str] = ("dense",),
                  options: Mapping[str, Any] | None = None, settings: Settings | None = None,
                  num_actors: int = 2, *, text_column: str = "text", batch_size: int = 64,
                  num_cpus: float = 0.5, num_gpus: float = 0,
                  preserve_order: bool = True) -> ray.data.Dataset:
    """`ds` with `model`'s output columns added, computed by `num_actors` actors holding an
    Engine each. `options`: encode's (is_query, instruction, lora_id, truncate) and
    `output_dtype`. `num_cpus` defaults to half a CPU per actor (whole CPUs per actor
    deadlocked a 2-CPU cluster with Ray Data's own tasks); on GPUs give `num_gpus`
    (fractions share a device). `preserve_order` keeps the input row order."""
    split_options(options)  # refuse bad options before any actor starts
    if preserve_order:
        ds.context.execution_options.preserve_order = True
    return ds.map_batches(
        Embedder, fn_constructor_kwargs={"model": model, "output_types": list(output_types),
                                         "options": dict(options or {}), "settings": settings,
                                         "text_column": text_column},
        batch_format="pyarrow", batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(size=num_actors), num_cpus=num_cpus,
        num_gpus=num_gpus or None)
