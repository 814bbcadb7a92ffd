"""DatusModule configuration: the checks made before any model work, and Louvain worker sizing."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from types import SimpleNamespace

import pytest
import torch

from datus.discovery.communities import worker_started_early
from datus.core.errors import ConfigurationError
from datus.discovery.module import DatusModule
from datus.core.workers import louvain_workers_for

TINY_VIT = {"depth": 1, "embed_dim": 48, "num_heads": 2}


def build(**settings: object) -> DatusModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        settings = {"louvain_workers": 0, **settings}
        return DatusModule(backbone="vit_tiny_patch16_224", weights="random", **settings)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"min_patches": -1}, "--model.min_patches"),
        ({"resolution": 0.0}, "--model.resolution"),
        ({"crop_batch_size": 0}, "--model.crop_batch_size"),
        ({"image_size": 70}, "not a multiple of the patch size"),
        ({"louvain_workers": -1}, "--model.louvain_workers"),
        ({"image_size": 0}, "--model.image_size"),
    ],
)
def test_bad_settings_name_the_option(settings: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        build(backbone_kwargs={**TINY_VIT, "patch_size": 8}, **settings)


@contextmanager
def set_up(device: str, early_worker: bool = False) -> Iterator[DatusModule]:
    """A module with ``louvain_workers="auto"`` set up as a trainer on ``device`` would, torn down after."""
    module = build(louvain_workers="auto", backbone_kwargs=TINY_VIT)
    module._trainer = SimpleNamespace(  # type: ignore[assignment]
        strategy=SimpleNamespace(root_device=torch.device(device)), precision="32-true"
    )
    with worker_started_early() if early_worker else nullcontext():
        module.setup("predict")
    try:
        assert module._pool is not None
        yield module
    finally:
        module.teardown("predict")


def test_auto_louvain_on_a_cpu_backbone_adopts_the_worker_the_command_started() -> None:
    """Louvain costs about a millisecond an image: the command's early worker, numba never in the main process."""
    with set_up("cpu", early_worker=True) as module:
        assert module._pool.num_workers == 1 and module._pool._executor is not None and not module._calibrate_workers


def test_auto_louvain_on_a_cpu_backbone_without_an_early_worker_stays_in_the_main_process() -> None:
    """A worker spawned now would import the caller's main script (torch, Lightning...) beside the backbone."""
    with set_up("cpu") as module:
        assert module._pool._executor is None


def test_auto_louvain_workers_beside_an_accelerator_are_measured_first() -> None:
    with set_up("cuda") as module:
        assert module._calibrate_workers and module._pool.num_workers == 0


@pytest.mark.parametrize(
    ("louvain_seconds", "backbone_seconds", "cores", "expected"),
    [(0.10, 0.01, 16, 10), (0.10, 1.0, 16, 1), (1.0, 0.001, 8, 7), (0.0, 0.01, 4, 1)],
)
def test_worker_count_keeps_louvain_below_the_device_time(
    louvain_seconds: float, backbone_seconds: float, cores: int, expected: int
) -> None:
    assert louvain_workers_for(louvain_seconds, backbone_seconds, cores) == expected
