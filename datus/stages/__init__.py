"""Stages 6-8 over the whole dataset, in the order postprocess runs them: the fit (fit, clustering/),
painting (labels, paint, shard_pass, crf), scoring (classes, score, metric, metrics) and diagnostics."""
