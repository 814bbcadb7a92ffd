"""The run folder: its layout, identity and lock (run), the per-image records (records) and their shards (shards)."""
