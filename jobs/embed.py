"""The main job: images -> predicted classes + embeddings, sharded across a Ray cluster.

    python -m jobs.embed --input DIR_OR_URI [...] --output OUT [--classifier SPEC] [--embedder SPEC]
                         [--limit N] [--batch-size B] [--num-gpus G] [--num-actors A] ...
    python -m jobs.embed --output OUT --delete FILE     (ids or image uris, one a line; - for stdin)

Runs against the Ray cluster it finds (``ray job submit``, ``RAY_ADDRESS``) or starts a local one,
when there is something to embed. Writes ``OUT/embeddings/*.parquet``, ``OUT/errors/*.parquet``,
``OUT/changes/run-*.json``, ``OUT/manifest.json``, ``OUT/summary.json`` and ``OUT/config.json``.
Re-running the same command follows the inputs: it embeds only new images and images whose content
changed, records images that left the inputs as deleted (the run's change log), and finishes an
interrupted run without redoing its work. ``--delete`` records deletions without reading the inputs.

This module parses the arguments; the job itself is :mod:`pipeline.embed_job`.
"""

from __future__ import annotations

import argparse
import logging
import sys

from pipeline.embed_job import prepare, run
from pipeline.embed_output import EmbedConfig, delete_images, describe_changes, parse_deletes
from pipeline.files import check_output_folder
from pipeline.images import DEFAULT_MAX_PIXELS
from pipeline.models import DEFAULT_CLASSIFIER, DEFAULT_EMBEDDER
from pipeline.storage import Location


def parse_args(argv: list[str] | None) -> EmbedConfig | argparse.Namespace:
    """The run's settings, or (``--delete``) the namespace with ``output`` and ``delete``."""
    parser = argparse.ArgumentParser(prog="python -m jobs.embed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", action="append", metavar="PATH_OR_URI",
                        help="folder (flat or class sub-folders), tar, webdataset shard or parquet; repeatable "
                             "(required, except with --delete)")
    parser.add_argument("--output", required=True,
                        help="output folder: on a cluster a shared filesystem or an object store (s3://bucket/prefix)")
    parser.add_argument("--delete", metavar="FILE",
                        help="delete images from OUT now: FILE holds one id or one image uri (as the job records "
                             "it: a path, file.tar#member) a line, - for stdin; records a run whose change log "
                             "holds only these deletions, without reading the inputs or starting Ray")
    parser.add_argument("--classifier", default=DEFAULT_CLASSIFIER,
                        help="a timm classifier spec; head:PATH, a classifier head (jobs.train_classifier) run on "
                             "the embedder's vectors (no second network); or none: embeddings only "
                             f"(default: {DEFAULT_CLASSIFIER})")
    parser.add_argument("--embedder", default=DEFAULT_EMBEDDER, help=f"default: {DEFAULT_EMBEDDER}")
    parser.add_argument("--top-n", type=int, default=5, help="predicted classes kept per image (default: 5)")
    parser.add_argument("--embedding-dtype", default="float32", choices=["float32", "float16"])
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                        help="reject images claiming more pixels (default: %(default)s)")
    parser.add_argument("--limit", type=int, help="process at most N new images (trial runs)")
    parser.add_argument("--batch-size", type=lambda v: v if v == "auto" else int(v), default="auto",
                        help="images per model forward pass, or auto (default): measured before the job "
                             "starts, on one GPU (or one actor's CPUs): the smallest size within 5%% of the "
                             "best throughput that fits in memory")
    parser.add_argument("--decode-batch-size", type=int, default=32, help="images per decode task batch")
    parser.add_argument("--files-per-shard", type=int, default=256, help="loose files per read task")
    parser.add_argument("--num-gpus", type=float,
                        help="GPUs per model actor, 1 or a fraction (default: 1 when the cluster has GPUs, else 0)")
    parser.add_argument("--num-actors", type=int,
                        help="model actors (default: GPUs in the cluster / --num-gpus; 1 without GPUs)")
    parser.add_argument("--model-cpus", type=float,
                        help="CPUs per model actor (default: 1 with GPUs; without, half the cluster's CPUs)")
    parser.add_argument("--model-threads", type=int,
                        help="torch CPU threads per model actor (default: all of a node's CPUs when "
                             "running without GPUs, torch's own choice with GPUs)")
    parser.add_argument("--model-memory-gb", type=float, default=2.0,
                        help="host memory reserved per model actor (default: 2; torch alone takes ~1.6)")
    parser.add_argument("--actor-start-timeout", type=int, default=600,
                        help="seconds to wait for all model actors to start (default: 600)")
    parser.add_argument("--stages", default="fused", choices=["fused", "separate"],
                        help="one actor pool for classify+embed (default) or two pools")
    parser.add_argument("--decode", default="cpu", choices=["cpu", "device"],
                        help="cpu: decode+resize in CPU tasks (default); device: send the encoded bytes to the "
                             "model actor and decode JPEGs on its GPU (nvJPEG), other formats on its CPU")
    parser.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                        help="torch.compile the models' backbones (default backend: inductor); the first "
                             "batch of each actor pays the compilation")
    parser.add_argument("--device", default="auto", help="model device inside actors: auto, cpu, cuda")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    args = parser.parse_args(argv)
    if args.delete is not None:
        if args.input:
            parser.error("--delete takes no --input (it reads only OUT and the list)")
        return args
    if not args.input:
        parser.error("the following arguments are required: --input")
    if problem := check_output_folder(args.output):
        parser.error(problem)
    try:
        return EmbedConfig(
            inputs=tuple(args.input), output=args.output, classifier=args.classifier, embedder=args.embedder,
            top_n=args.top_n, embedding_dtype=args.embedding_dtype, max_pixels=args.max_pixels,
            limit=args.limit, batch_size=args.batch_size, decode_batch_size=args.decode_batch_size,
            files_per_shard=args.files_per_shard, num_gpus=args.num_gpus, num_actors=args.num_actors,
            model_cpus=args.model_cpus, model_memory_gb=args.model_memory_gb, model_threads=args.model_threads,
            actor_start_timeout_s=args.actor_start_timeout, stages=args.stages, decode=args.decode,
            compile=args.compile, device=args.device, precision=args.precision)
    except ValueError as exc:
        parser.error(str(exc))


def delete(output: str, source: str) -> int:
    """``--delete``: records the deletions, prints what it did."""
    try:
        if source == "-":
            ids, entries = parse_deletes(sys.stdin)
        else:
            with open(source, encoding="utf-8") as f:
                ids, entries = parse_deletes(f)
        result = delete_images(Location(output), ids)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if result.finished:
        print(f"finished interrupted run {result.finished} first (its change log written)")
    unknown = f"; {result.unknown} of {len(ids)} ids name no image in the output (never embedded, or deleted already)" \
        if result.unknown else ""
    if result.run:
        print(f"run {result.run}: {result.deleted} deleted ({output}/changes/run-{result.run:06d}.json){unknown}")
    else:
        print(f"nothing deleted ({entries} entries read){unknown}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parses flags, connects to (or starts) Ray when there is something to embed, runs the job and
    prints the summary; the last line says what changed."""
    config = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if isinstance(config, argparse.Namespace):
        return delete(config.output, config.delete)
    try:
        prepared = prepare(config)  # bad model names, weights or inputs fail here, before Ray starts
        summary = run(config, prepared)  # starts (or connects to) Ray only when something is to be read
    except (ValueError, FileNotFoundError) as exc:
        # The user's mistake (bad flags, paths, weights): one clear line, no traceback.
        print(f"error: {exc}", file=sys.stderr)
        return 2
    counts = summary["counts"]
    print(f"\nembedded {counts['embedded']} images, {counts['failed']} failed "
          f"({', '.join(f'{k}: {v}' for k, v in counts['failed_by_type'].items()) or 'none'}); "
          f"this run: {summary['embedded_this_run']} images in {summary['wall_s']} s "
          f"({summary['images_per_s']} images/s)")
    print(f"outputs: {prepared.out}/{{embeddings,errors,changes,manifest.json,summary.json}}")
    print(describe_changes(summary["changes"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
