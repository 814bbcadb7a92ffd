"""Two CPU processes (DDP, gloo) through the real CLI give the single-process results."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from datus.core.io import read_label_png
from datus.runfolder.run import Run
from tests.conftest import image_ids
from tests.generated import TINY, records_of, run_ddp_predict

pytestmark = pytest.mark.integration



def test_two_process_ddp_equals_single_process(dataset: Path, finished_run: Path, tmp_path: Path) -> None:
    finished = run_ddp_predict(
        "--config", TINY, "--data.root", str(dataset), "--data.split", "train", "--data.batch_size", "2",
        "--output_dir", str(tmp_path), "--trainer.enable_progress_bar", "false",
    )  # fmt: skip
    assert finished.stderr.count("RANDOM WEIGHTS") == 1, finished.stderr  # once on the console, not once per rank

    ranks = {path.name[:7] for path in Run(tmp_path).shards()}
    assert ranks == {"rank000", "rank001"}  # both processes wrote their own shards
    distributed = [r.image_id for r in records_of(tmp_path)]
    assert sorted(distributed) == image_ids(dataset)  # every image exactly once
    single = {r.image_id: r for r in records_of(finished_run)}
    for record in records_of(tmp_path):
        reference = single[record.image_id]
        assert np.array_equal(record.segment_map, reference.segment_map)
        assert np.allclose(record.embeddings.astype(np.float32), reference.embeddings.astype(np.float32), atol=2e-3)
    for image_id in image_ids(dataset):
        assert np.array_equal(
            read_label_png(tmp_path / "masks" / f"{image_id}.png"), read_label_png(finished_run / "masks" / f"{image_id}.png")
        ), image_id
    assert (tmp_path / "metrics.json").read_text() == (finished_run / "metrics.json").read_text()
