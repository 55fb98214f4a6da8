"""Store: the output folder, its Parquet contract (``schema``), its writer and its reader.

``writer`` writes shards atomically with resume and a lock, ``reader`` reads and verifies a
finished output, ``names`` knows which files profit-prep owns, ``shard_counts`` the counts each
shard carries, ``safe_files`` the link-safe file primitives, ``combine`` joins two outputs.
"""
