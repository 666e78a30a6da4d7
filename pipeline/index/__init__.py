"""Class-sharded FAISS indexes: build, save, load, search (class-restricted and global), append.

Layout of an index folder (each publish is an immutable version: :mod:`pipeline.index.versions`)::

    manifest.json                  the current version: models, metric, dim, class -> (shard, start,
                                   end), files + sha256; written last, it is the pointer readers follow
    versions/000002.json           every published version's manifest
    shards/0000-v000001/vectors.npy       the shard's embeddings, rows sorted by (class, id); memory-mapped
    shards/0000-v000001/rows.parquet      position -> id, uri, label, class, class_prob
    shards/0000-v000001/index.faiss       global-search index over the same rows (flat up to 50k rows,
                                          HNSW over 8-bit codes above; IVF, IVF-PQ or HNSW-Flat on request)
    shards/0000-v000001/head-000042.faiss a head class's own HNSW index (classes of >= head_min_rows rows)
    tombstones/0000-v000002.npy    positions of the shard's deleted rows as of version 2, skipped inside
                                   every FAISS search (an ID selector) and every exact scan

Rows are sorted by top-1 predicted class, so every class is one contiguous position range inside
one shard, and a shard is a run of whole classes. A class-restricted search (Approach 2: classify,
then rank the predicted class's images) is an exact scan of one slice of ``vectors.npy``, or, for
a head class, a search of its own index; a global search queries every shard's index with the
whole batch of queries and merges by score. Approximate candidates are re-scored exactly from
``vectors.npy`` (float32, or float16 at half the bytes); ``SearchParams`` holds the search settings.
"""

from pipeline.index.build import (ROW_SCHEMA, append_index, build_index, delete_from_index, live_ids, plan_shards,
                                  update_index, write_shard)
from pipeline.index.faiss_index import (
    GLOBAL_INDEX_TYPES,
    IndexConfig,
    SearchParams,
    build_faiss_index,
    choose_index_type,
)
from pipeline.index.reader import Hit, ShardedIndex
from pipeline.index.versions import IndexIntegrityError

__all__ = ["GLOBAL_INDEX_TYPES", "ROW_SCHEMA", "Hit", "IndexConfig", "IndexIntegrityError", "SearchParams", "ShardedIndex",
           "append_index", "build_faiss_index", "build_index", "choose_index_type", "delete_from_index", "live_ids",
           "plan_shards", "update_index", "write_shard"]
