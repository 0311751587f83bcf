"""The shard pipeline: fetch, verify, rotate/resize, tf.Example, TFRecord, commit (Ray only in distribute)."""
