"""DatusModule configuration: the paper preset and the checks made before any model work."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch

from datus.module import DatusModule

TINY_VIT = {"depth": 1, "embed_dim": 48, "num_heads": 2}


def build(**settings: object) -> DatusModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        settings = {"louvain_workers": 0, **settings}
        return DatusModule(backbone="vit_tiny_patch16_224", weights="random", **settings)  # type: ignore[arg-type]


def test_paper_preset_overrides_with_the_original_choices() -> None:
    module = build(
        preset="paper", image_size=64, min_patches=1, crop_recipe="fit", resolution=2.0,
        backbone_kwargs={**TINY_VIT, "patch_size": 8},
    )  # fmt: skip
    described = module.describe()
    assert (described["image_size"], described["min_patches"], described["crop_recipe"], described["resolution"]) == (
        224, 5, "paper", 1.0,
    )  # fmt: skip
    assert module.grid == (28, 28)


def test_paper_preset_refuses_a_patch_16_backbone() -> None:
    with pytest.raises(ValueError, match="preset paper uses patch size 8"):
        build(preset="paper", backbone_kwargs=TINY_VIT)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"min_patches": -1}, "--model.min_patches"),
        ({"resolution": 0.0}, "--model.resolution"),
        ({"crop_batch_size": 0}, "--model.crop_batch_size"),
        ({"image_size": 70}, "not a multiple of the patch size"),
        ({"louvain_workers": -1}, "--model.louvain_workers"),
    ],
)
def test_bad_settings_name_the_option(settings: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build(backbone_kwargs={**TINY_VIT, "patch_size": 8}, **settings)


def test_explicit_louvain_workers_are_kept() -> None:
    assert build(louvain_workers=3, backbone_kwargs=TINY_VIT).louvain_worker_count() == 3


def test_auto_louvain_workers_stay_off_a_cpu_backbone() -> None:
    """On a CPU run the workers would compete with the backbone's threads for the same cores."""
    module = build(louvain_workers="auto", backbone_kwargs=TINY_VIT)
    assert module.louvain_worker_count() == 0
    module._trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cpu")), num_devices=2)  # type: ignore[assignment]
    assert module.louvain_worker_count() == 0


def test_auto_louvain_workers_share_the_cores_between_local_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    module = build(louvain_workers="auto", backbone_kwargs=TINY_VIT)
    monkeypatch.setattr("datus.module._available_cores", lambda: 16)
    for devices, expected in ((1, 8), (4, 2), (16, 1)):
        gpu_rank = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cuda", 0)), num_devices=devices)
        module._trainer = gpu_rank  # type: ignore[assignment]
        assert module.louvain_worker_count() == expected, devices
