"""On a CUDA device: mixed precision runs end to end (off by default; run with -m gpu)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import NUM_IMAGES, predict

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_mixed_precision_run_on_cuda(dataset: Path, tmp_path: Path, precision: str) -> None:
    predict(
        dataset, tmp_path, "--trainer.accelerator", "gpu", "--trainer.devices", "1",
        "--trainer.precision", precision, "--cluster.engine", "torch",
    )  # fmt: skip
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["images_in_run"] == NUM_IMAGES
    assert (tmp_path / "metrics.json").is_file()
