"""Build (or extend) a class-sharded FAISS index from an embedding job's output.

    python -m jobs.build_index --embeddings OUT --output INDEX [--shard-size N]
                               [--global-index auto|flat|hnsw-sq8|ivf|ivfpq|hnsw] [--head-min-rows N]
                               [--vector-dtype float32|float16] [--ef-search N] [--head-ef-search N] [--refine N]
                               [--classes labels|predicted] [--classifier head:PATH]
                               [--append] [--ray] [--strategy NAME|FILE]
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
rebuilding only the shards whose classes gained images. ``--ray`` builds shards in parallel as
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

import ray

from pipeline.files import check_output_folder
from pipeline.index import GLOBAL_INDEX_TYPES, IndexConfig, SearchParams, append_index, build_index
from pipeline.index.faiss_index import HEAD_MIN_ROWS
from pipeline.index.keying import CLASS_SOURCES, UNLABELLED
from pipeline.manifests import IndexManifest
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


def main(argv: list[str] | None = None) -> int:
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
    parser.add_argument("--append", action="store_true", help="add to the existing index at --output")
    parser.add_argument("--ray", action="store_true", help="build shards in parallel as Ray tasks")
    parser.add_argument("--strategy", help="default search strategy: global, class[@N], gated[@N]:TAU, rerank:BETA "
                                           "or a jobs.evaluate --recommend file (default: global)")
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
    if args.embeddings is None:
        if strategy is None:
            parser.error("give --embeddings (to build or --append), or --strategy to set an existing index's")
        try:
            manifest = replace(IndexManifest.read(output), strategy=strategy)
        except (ValueError, FileNotFoundError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        manifest.write(output)
        print(f"index {output}: default strategy {strategy['name']}")
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
        if args.append:
            if args.classes or args.classifier:
                raise ValueError("--append keys new rows as the index was keyed: drop --classes and --classifier")
            manifest = append_index(args.embeddings, output, mapper=mapper, strategy=strategy)
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
    print(f"index {output}: {summary['rows']} images, {summary['classes']} classes, "
          f"{summary['shards']} shards ({', '.join(kinds)}), {heads} head-class indexes, built in {seconds:.1f} s; default strategy {default}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
