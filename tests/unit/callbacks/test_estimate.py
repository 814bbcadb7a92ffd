"""The cost estimate: measured after warm-up, said once, only when the wait is worth saying."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from datus.callbacks.estimate import CostEstimate, estimate_line
from datus.runfolder.records import PredictionBatch


def _batch(images: int) -> Any:
    return PredictionBatch(records=[object()] * images, skipped=[], stage_seconds={}, backbone_passes=0)


def test_the_first_batch_is_warm_up_and_the_estimate_is_said_once() -> None:
    now = [0.0]
    estimate = CostEstimate(clock=lambda: now[0])
    estimate._total = 1000
    trainer, module = SimpleNamespace(is_global_zero=True), SimpleNamespace(embedding="crop")
    for seconds in (30.0, 2.0, 2.0):  # a slow first batch (warm-up), then 8 images in 2 s
        now[0] += seconds
        estimate.on_predict_batch_end(trainer, module, _batch(8), None, 0)  # type: ignore[arg-type]
    assert estimate.said == (
        "about 0.25 s an image here: the 984 images left take about 4 min "
        "(--model.embedding packed is about twice as fast on a CPU; more --trainer.devices share it)"
    )


def test_short_work_is_not_announced() -> None:
    assert estimate_line(1.0, 8, 100, SimpleNamespace(embedding="packed")) == ""
    assert estimate_line(10.0, 8, 100, SimpleNamespace(embedding="packed")) == "about 1.25 s an image here: the 100 images left take about 2 min"
