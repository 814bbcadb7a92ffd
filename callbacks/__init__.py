"""Lightning callbacks: shard writing and dataset-level post-processing."""
