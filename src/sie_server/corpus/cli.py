"""`sie-server encode`: flags, backend choice, and the summary."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from ..flags import add_model_flags
from ..quantize import OUTPUT_DTYPES
from .readers import FORMATS


def _model(value: str) -> tuple[str, str | None]:
    name, sep, source = value.partition("=")
    if not name or (sep and not source):
        raise argparse.ArgumentTypeError("expected NAME or NAME=PATH_OR_HUB_ID")
    return name, source or None


def _positive(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return n


def _types(value: str) -> list[str]:
    types = [t.strip() for t in value.split(",") if t.strip()]
    bad = [t for t in types if t not in ("dense", "sparse", "multivector")]
    if not types or bad:
        raise argparse.ArgumentTypeError("expected a comma list of dense, sparse, multivector")
    return list(dict.fromkeys(types))


def _fields(value: str) -> list[str]:
    fields = [f.strip() for f in value.split(",") if f.strip()]
    if not fields:
        raise argparse.ArgumentTypeError("expected a comma list of field names")
    return list(dict.fromkeys(fields))


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    e = sub.add_parser("encode", help="encode a corpus of files into Parquet shards (resumable)",
                       description="Encode every row of INPUT files into Parquet shards in "
                       "--output; rerun the same command to resume after any interruption.")
    e.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="files, globs or folders: .jsonl .csv .tsv .parquet .txt, also .gz/.zst")
    e.add_argument("--model", required=True, type=_model, metavar="NAME[=PATH]",
                   help="the model: a catalog name, or NAME=folder-or-hub-id")
    e.add_argument("--output", "-o", required=True, type=Path, help="output folder")
    e.add_argument("--output-types", type=_types, default=["dense"], metavar="TYPES",
                   help="comma list of dense, sparse, multivector (default dense)")
    e.add_argument("--output-dtype", choices=OUTPUT_DTYPES, default="float32")
    e.add_argument("--text-field", default="text", help="text column/key (default text)")
    e.add_argument("--id-field", help="id column/key (default: 'id' when the first input's "
                   "rows have an 'id' field, else the row's position; '' for positions); the "
                   "manifest's 'ids' says which")
    e.add_argument("--keep-fields", type=_fields, default=[], metavar="FIELDS",
                   help="comma list of input fields to copy into the output as string columns "
                   "(e.g. title,url,metadata; objects and numbers as JSON text, missing as null)")
    e.add_argument("--format", choices=FORMATS, help="input format (default: from file names)")
    e.add_argument("--is-query", action="store_true", help="encode the texts as queries")
    e.add_argument("--instruction", help="instruction for instruction-tuned models")
    e.add_argument("--lora-id", help="encode with this LoRA adapter")
    e.add_argument("--on-bad-row", choices=("fail", "skip"), default="fail",
                   help="rows without usable text or id, or whose text the model refuses (413): "
                   "stop the run (default) or skip and report them")
    e.add_argument("--shard-rows", type=_positive,
                   help="input rows per shard (default 100000; 10000 with multivector)")
    e.add_argument("--batch-size", type=_positive, default=256, help="texts per request (default 256)")
    e.add_argument("--concurrency", type=_positive, default=8,
                   help="requests in flight (default 8)")
    add_model_flags(e, model_flag=False)
    e.add_argument("--server", metavar="URL", help="encode through this sie-server instead of "
                   "in this process")
    e.add_argument("--api-key", help="the server's API key (default: env SIE_API_KEY)")
    e.add_argument("--retry-timeout", type=float, default=300.0,
                   help="--server: seconds to keep retrying 429/5xx/lost connections (default 300)")
    e.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                   help="encode on Ray Data actors: a cluster address ('auto', 'ray://host:10001')"
                   ", or a local cluster when no address is given; one Ray job per shard")
    e.add_argument("--ray-actors", type=_positive, default=2, help="--ray: actors (default 2)")
    e.add_argument("--ray-cpus", type=float, default=0.5, help="--ray: CPUs per actor (default 0.5)")
    e.add_argument("--ray-gpus", type=float, default=0, help="--ray: GPUs per actor (default 0)")
    e.add_argument("--log-every", type=float, default=10.0,
                   help="seconds between progress lines when not on a terminal (default 10)")
    e.add_argument("--log-level", default="warning")
    return e


def _options(args: argparse.Namespace) -> dict[str, Any]:
    opts = {"is_query": args.is_query, "instruction": args.instruction, "lora_id": args.lora_id}
    return {k: v for k, v in opts.items() if v}


def _backend(args: argparse.Namespace, model: str, options: dict[str, Any]):
    from .backends import InProcessBackend, RayBackend, ServerBackend

    if args.server:
        return ServerBackend(args.server, model, args.output_types, options,
                             api_key=args.api_key or os.environ.get("SIE_API_KEY"),
                             concurrency=args.concurrency, retry_s=args.retry_timeout)
    from ..config import Settings
    from ..engine import Engine

    name, source = args.model
    settings = Settings.from_env(
        device=args.device, dtype=args.dtype, models={name: source} if source else {},
        default_models=[], catalog_files=args.catalog, allow_download=args.allow_download,
        adapter_roots=args.adapter_roots, max_batch_tokens=args.max_batch_tokens,
        max_batch_items=args.max_batch_items)
    if args.ray:
        return RayBackend(None if args.ray == "local" else args.ray, settings, model,
                          args.output_types, options, num_actors=args.ray_actors,
                          num_cpus=args.ray_cpus, num_gpus=args.ray_gpus)
    engine = Engine(settings)
    try:
        return InProcessBackend(engine, model, args.output_types, options)
    except BaseException:
        engine.close()
        raise


def main(args: argparse.Namespace) -> int:
    from .. import logs
    from ..errors import SIEError
    from .readers import InputError, default_id_field, expand
    from .run import BadRowError, Job, run
    from .writer import ManifestMismatch

    logs.configure(args.log_level)
    model = args.model[0]
    if args.server and args.model[1]:
        return _fail("--model NAME=PATH loads weights in this process; with --server pass the "
                     "server's model name")
    if args.server and args.ray:
        return _fail("--server and --ray are two backends; pick one")
    try:
        files = expand(args.inputs)
        shard_rows = args.shard_rows or (10_000 if "multivector" in args.output_types else 100_000)
        id_field = args.id_field if args.id_field is not None else \
            default_id_field(files, args.format)
        job = Job(files=files, output=args.output, output_types=args.output_types,
                  output_dtype=args.output_dtype, options=_options(args),
                  text_field=args.text_field, id_field=id_field or None,
                  id_field_default=args.id_field is None and id_field is not None,
                  keep_fields=args.keep_fields, format=args.format,
                  shard_rows=shard_rows, on_bad_row=args.on_bad_row,
                  # Ray: one Dataset per shard, the next one read while this one runs
                  batch_size=shard_rows if args.ray else args.batch_size,
                  concurrency=1 if args.ray else args.concurrency,
                  split_refused=not args.ray,
                  log_interval_s=args.log_every)
        backend = _backend(args, model, job.options)
        try:
            summary = run(job, backend)
        finally:
            backend.close()
    except (InputError, BadRowError, ManifestMismatch, SIEError, ValueError) as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        print("sie-server encode: interrupted; the same command resumes", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - e.g. the SDK's errors; shown, not a traceback
        if type(e).__module__.startswith("sie_sdk"):
            return _fail(f"{type(e).__name__}: {e}")
        raise
    if summary["already_complete"]:
        print(f"encode: {args.output} is already complete ({summary['rows']:,} rows); "
              "nothing to do", file=sys.stderr)
    else:
        print(f"encode: {summary['rows_this_run']:,} rows, {summary['tokens_this_run']:,} "
              f"tokens in {summary['seconds']:.1f}s ({summary['tokens_per_s']:,.0f} tokens/s); "
              f"{summary['skipped']} skipped"
              + (f" (first ids: {', '.join(summary['skipped_first_ids'])})"
                 if summary["skipped"] else "")
              + f"; {summary['rows']:,} rows in {summary['shards']} shards in {args.output}"
              + f"; ids: {job.ids()}", file=sys.stderr)
    print(json.dumps(summary))
    return 0


def _fail(message: str) -> int:
    print(f"sie-server encode: error: {message}", file=sys.stderr)
    return 1
