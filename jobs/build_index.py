"""Build (or extend) a class-sharded FAISS index from an embedding job's output.

    python -m jobs.build_index --embeddings OUT --output INDEX [--shard-size N]
                               [--global-index auto|flat|hnsw-sq8|ivf|ivfpq|hnsw] [--head-min-rows N]
                               [--vector-dtype float32|float16] [--ef-search N] [--head-ef-search N] [--refine N]
                               [--classes labels|predicted] [--classifier head:PATH]
                               [--append | --update] [--ray] [--strategy NAME|FILE]
    python -m jobs.build_index --output INDEX --delete FILE            # takedown: ids or URIs, one a line
    python -m jobs.build_index --output INDEX --strategy NAME|FILE     # set it on an existing index

Rows are grouped by class: ``--classes labels``, the gallery's own labels (folder names, synset tar
names, webdataset .cls; rows without a label, or with one the query classifier does not know, form a
bucket that only global search reaches), or ``--classes predicted``, the classifier's top-1
prediction for each image. The default is labels when the rows have labels and at least half of the
distinct labels are classes of the query classifier (a synset-named gallery with an ImageNet
classifier, or a head fitted on the gallery), else predicted. ``--classifier head:PATH`` makes a
classifier head (``jobs.train_classifier``) the index's query classifier: the output is re-keyed
from its stored vectors, nothing is embedded again. Each class gets a contiguous range inside one
shard; shards are cut at class boundaries. Classes of at least ``--head-min-rows`` images get their own
HNSW index for class-restricted search. ``--append`` adds a new embedding output to an existing index,
rebuilding only the shards whose classes gained images. ``--update`` applies what the runs of an
embedding output changed since the index last saw it (their change logs: new images added, changed
ones replaced, deleted ones gone); ``--delete FILE`` removes images at once (a takedown). Every
build, append, update or delete publishes a new immutable version of the index (new files under
new names, the pointer ``manifest.json`` written last), so a reader or a serving replica never
sees a half-written one; deleted rows are tombstones that no search returns, compacted away when
a shard's deleted fraction passes ``--compact-at``. ``--ray`` builds shards in parallel as
Ray tasks (for large builds; connects to the cluster under ``ray job submit``). ``--strategy``
records the search strategy that ``jobs.search`` and the service use by default (a name, or the
file ``jobs.evaluate --recommend`` writes); an index without one is searched globally.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import replace

import numpy as np
import ray

from pipeline.files import check_output_folder
from pipeline.index import GLOBAL_INDEX_TYPES, IndexConfig, SearchParams, build_index, live_ids, update_index
from pipeline.index.faiss_index import HEAD_MIN_ROWS
from pipeline.index.keying import CLASS_SOURCES, UNLABELLED
from pipeline.index.versions import GRACE_S, KEEP_VERSIONS, publish
from pipeline.manifests import IndexManifest, now
from pipeline.embed_output import parse_deletes
from pipeline.storage import Location
from pipeline.strategy import Strategy

logger = logging.getLogger("jobs.build_index")


def _ray_mapper():
    """A ``map`` that runs each shard build as a Ray task (shards in parallel across the cluster)."""
    if not ray.is_initialized():
        ray.init(logging_level=logging.WARNING)

    def mapper(fn, jobs):
        remote = ray.remote(num_cpus=1)(fn)
        return ray.get([remote.remote(job) for job in jobs])

    return mapper


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m jobs.build_index`` (flags only; :func:`main` checks the rest)."""
    parser = argparse.ArgumentParser(prog="python -m jobs.build_index", description=__doc__.split("\n\n")[0])
    parser.add_argument("--embeddings", help="the --output folder of jobs.embed (a folder or s3://bucket/prefix)")
    parser.add_argument("--output", required=True, help="index folder (a folder or s3://bucket/prefix)")
    parser.add_argument("--shard-size", type=int, default=1_000_000, help="most rows per shard (default: 1000000)")
    parser.add_argument("--global-index", default="auto", choices=GLOBAL_INDEX_TYPES,
                        help="global search index per shard (auto: exact up to 50k rows, hnsw-sq8 above)")
    parser.add_argument("--head-min-rows", type=int, default=HEAD_MIN_ROWS,
                        help=f"classes with at least this many images get their own HNSW index; 0: none "
                             f"(default: {HEAD_MIN_ROWS})")
    parser.add_argument("--nlist", type=int, help="IVF lists per shard (default: ~4 sqrt(rows))")
    parser.add_argument("--pq-m", type=int, default=32, help="IVF-PQ sub-quantisers (default: 32)")
    parser.add_argument("--vector-dtype", default="float32", choices=["float32", "float16"],
                        help="storage of the vectors (exact scans and re-scoring); float16 halves their bytes")
    defaults = SearchParams()
    parser.add_argument("--ef-search", type=int, default=defaults.ef_search,
                        help=f"HNSW search breadth of the global indexes (default: {defaults.ef_search})")
    parser.add_argument("--head-ef-search", type=int, default=defaults.head_ef_search,
                        help=f"search breadth of the head classes' indexes (default: {defaults.head_ef_search})")
    parser.add_argument("--refine", type=int, default=defaults.refine,
                        help=f"approximate candidates per result, re-scored exactly (default: {defaults.refine})")
    parser.add_argument("--nprobe", type=int, default=defaults.nprobe,
                        help=f"IVF lists visited per query (default: {defaults.nprobe})")
    parser.add_argument("--classes", choices=CLASS_SOURCES,
                        help="class partition: labels (the gallery's own) or predicted (the classifier's top-1); "
                             "default: labels when the rows have labels and at least half of the distinct labels "
                             "are classes of the query classifier, else predicted")
    parser.add_argument("--classifier",
                        help="a classifier head (head:PATH, from jobs.train_classifier) to use as the index's query "
                             "classifier; re-keys the output from its stored vectors (default: the output's classifier)")
    change = parser.add_mutually_exclusive_group()
    change.add_argument("--append", action="store_true", help="add the output's images the index lacks (a new version)")
    change.add_argument("--update", action="store_true",
                        help="apply the output's change logs since the index last saw it: add new images, replace "
                             "changed ones, remove deleted ones (a new version)")
    parser.add_argument("--delete", metavar="FILE",
                        help="remove these images from the index at --output (a new version): a file of image ids "
                             "or URIs, one a line; - reads standard input")
    parser.add_argument("--compact-at", type=float, default=0.2,
                        help="rebuild a shard without its deleted rows once they pass this fraction of it "
                             "(default: 0.2)")
    parser.add_argument("--keep-versions", type=int, default=KEEP_VERSIONS,
                        help=f"versions kept however old (default: {KEEP_VERSIONS}); older ones are removed "
                             f"--grace seconds after their successor is published")
    parser.add_argument("--grace", type=float, default=GRACE_S,
                        help=f"seconds a superseded version stays readable (default: {GRACE_S:.0f})")
    parser.add_argument("--ray", action="store_true", help="build shards in parallel as Ray tasks")
    parser.add_argument("--strategy", help="default search strategy: global, class[@N], gated[@N]:TAU, rerank:BETA "
                                           "or a jobs.evaluate --recommend file (default: global)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if problem := check_output_folder(args.output):
        parser.error(problem)
    output = Location(args.output)
    try:
        strategy = None if args.strategy is None else Strategy.load(args.strategy).to_json()
        search = SearchParams(ef_search=args.ef_search, head_ef_search=args.head_ef_search, nprobe=args.nprobe,
                              refine=args.refine)
        config = IndexConfig(shard_size=args.shard_size, global_index=args.global_index, nlist=args.nlist,
                             pq_m=args.pq_m, head_min_rows=args.head_min_rows or None)
    except ValueError as exc:
        parser.error(str(exc))
    if args.delete is not None:
        if args.embeddings is not None or args.append or args.update:
            parser.error("--delete takes only --output (apply an output's own deletions with --update)")
        return _delete(output, args)
    if args.embeddings is None:
        if strategy is None:
            parser.error("give --embeddings (to build, --append or --update), --delete FILE, or --strategy to set "
                         "an existing index's")
        try:
            old = IndexManifest.read(output)
            manifest = publish(output, replace(old, strategy=strategy, version=old.version + 1, created=now()))
        except (ValueError, FileNotFoundError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"index {output}: default strategy {strategy['name']} (version {manifest.version})")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        output.check_reachable()
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    mapper = _ray_mapper() if args.ray else map
    start = time.perf_counter()
    try:
        if args.append or args.update:
            if args.classes or args.classifier:
                raise ValueError("--append and --update key new rows as the index was keyed: drop --classes and "
                                 "--classifier")
            before = IndexManifest.read(output)
            manifest = update_index(output, args.embeddings, only_new=args.append, mapper=mapper, strategy=strategy,
                                    compact_at=args.compact_at, keep_versions=args.keep_versions, grace_s=args.grace)
            print(f"version {manifest.version}: {manifest.rows - before.rows:+d} images "
                  f"({before.rows} -> {manifest.rows})")
        else:
            manifest = build_index(args.embeddings, output, config, args.vector_dtype, mapper=mapper,
                                   strategy=strategy, search=search, classes=args.classes,
                                   classifier=args.classifier)
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start
    kinds = sorted({s.index_type for s in manifest.shards})
    heads = sum(len(s.heads) for s in manifest.shards)
    summary = {"rows": manifest.rows, "classes": len(manifest.classes), "shards": len(manifest.shards),
               "global_index": kinds, "head_indexes": heads, "seconds": round(seconds, 2)}
    (output / "build_summary.json").write_json(summary)
    default = (manifest.strategy or {}).get("name", "global")
    keyed = manifest.class_source or {"source": "predicted"}
    if keyed["source"] == "labels":
        unknown = keyed.get("gallery_labels_unknown") or []
        print(f"classes: the gallery's labels ({keyed['gallery_labels_known']} of them are classes of "
              f"{keyed['label_space']}{'; not: ' + ', '.join(unknown[:5]) if unknown else ''}); "
              f"{manifest.class_size(UNLABELLED)} images in the unlabelled bucket (global search only)")
    else:
        print(f"classes: the top-1 prediction of {manifest.models.spec('classifier')}")
    print(f"index {output} version {manifest.version}: {summary['rows']} images, {summary['classes']} classes, "
          f"{summary['shards']} shards ({', '.join(kinds)}), {heads} head-class indexes, built in {seconds:.1f} s; default strategy {default}")
    return 0


def _delete(output: Location, args: argparse.Namespace) -> int:
    try:
        text = sys.stdin.read() if args.delete == "-" else Location(args.delete).read_text()
        ids, _ = parse_deletes(text.splitlines())  # the list jobs.embed --delete reads
        present = np.intersect1d(ids, live_ids(output))
        if not len(present):
            print(f"index {output}: none of the {len(ids)} images is in it; nothing published")
            return 0
        manifest = update_index(output, delete_ids=present, compact_at=args.compact_at,
                                keep_versions=args.keep_versions, grace_s=args.grace)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"index {output} version {manifest.version}: {len(present)} images deleted "
          f"({len(ids) - len(present)} of the {len(ids)} given were not in it); {manifest.rows} images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
