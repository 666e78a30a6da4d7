"""Class-sharded FAISS indexes: build, save, load, search (class-restricted and global), append.

Layout of an index folder::

    manifest.json                 models, metric, dim, class -> (shard, start, end), files + sha256
    shards/0000/vectors.npy       this shard's embeddings, rows sorted by (class, id); memory-mapped
    shards/0000/rows.parquet      position -> id, uri, label, class, class_prob
    shards/0000/index.faiss       global-search index over the same rows (flat, IVF, IVF-PQ or HNSW)

Rows are sorted by top-1 predicted class, so every class is one contiguous position range inside
one shard, and a shard is a run of whole classes. A class-restricted search (Approach 2: classify,
then rank the predicted class's images) is an exact scan of one small slice of ``vectors.npy``;
a global search queries every shard's FAISS index and merges by score.
"""

from pipeline.index.build import ROW_SCHEMA, append_index, build_index, plan_shards, write_shard
from pipeline.index.faiss_index import GLOBAL_INDEX_TYPES, IndexConfig, build_faiss_index, choose_index_type
from pipeline.index.reader import Hit, IndexIntegrityError, ShardedIndex

__all__ = ["GLOBAL_INDEX_TYPES", "ROW_SCHEMA", "Hit", "IndexConfig", "IndexIntegrityError", "ShardedIndex",
           "append_index", "build_faiss_index", "build_index", "choose_index_type", "plan_shards", "write_shard"]
