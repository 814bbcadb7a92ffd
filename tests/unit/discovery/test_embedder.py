"""A segment embedder other than the discovery ViT: MoCo v2 checkpoints, CNN and ViT embedders, run identity.

Every checkpoint is written by the test itself (nothing can be downloaded). The CNN is timm's
``resnet10t`` (deep stem) or ``resnet18`` (plain stem, like the ``resnet50`` of MoCo v2): the
loader is the same for every timm ResNet, and these two run in seconds on a CPU.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from torch import Tensor

from datus.discovery.backbones import EMBEDDER, WeightsError, build_embedder, load_frozen_weights
from datus.discovery.communities import SegmentPartition
from datus.core.errors import ConfigurationError
from datus.stages.fit import EMBEDDING_IDENTITY
from datus.core.io import read_label_png
from datus.discovery.module import DatusModule
from datus.discovery.ops import masked_crops, segment_masks
from datus.runfolder.run import Run
from tests.conftest import image_ids, predict
from tests.generated import records_of

TINY_VIT = {"depth": 2, "embed_dim": 48, "num_heads": 2, "patch_size": 8}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def build(**settings: Any) -> DatusModule:
    """A tiny random discovery ViT (mean/std 0.5, unlike ImageNet's) with ``settings`` on top."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        options = {"image_size": 32, "louvain_workers": 0, "backbone_kwargs": TINY_VIT, **settings}
        return DatusModule(backbone="vit_tiny_patch16_224", weights="random", **options)


def random_state(name: str, seed: int = 7) -> dict[str, Tensor]:
    """Weights for timm's ``name`` without classifier that no freshly built model has by chance."""
    model = timm.create_model(name, pretrained=False, num_classes=0)
    generator = torch.Generator().manual_seed(seed)
    return {
        key: torch.randint(0, 5, value.shape, generator=generator) if key.endswith("num_batches_tracked")
        else torch.rand(value.shape, generator=generator) + 0.5 if key.endswith("running_var")
        else torch.randn(value.shape, generator=generator)
        for key, value in model.state_dict().items()
    }


def write_moco_v2(path: Path, encoder: dict[str, Tensor]) -> Path:
    """A MoCo v2 training checkpoint as facebookresearch/moco's main_moco.py saves it.

    The query encoder under ``module.encoder_q.`` with its 2-layer MLP head ``fc.0``/``fc.2``,
    the momentum key encoder, the queue, and the optimizer state.
    """
    head = {"fc.0.weight": torch.randn(512, 512), "fc.0.bias": torch.randn(512),
            "fc.2.weight": torch.randn(128, 512), "fc.2.bias": torch.randn(128)}
    network = {**encoder, **head}
    state_dict = {f"module.encoder_q.{key}": value for key, value in network.items()}
    state_dict |= {f"module.encoder_k.{key}": value + 1 for key, value in network.items()}
    state_dict |= {"module.queue": torch.randn(128, 65536 // 512), "module.queue_ptr": torch.zeros(1, dtype=torch.long)}
    optimizer = {"state": {}, "param_groups": [{"lr": 0.03, "momentum": 0.9, "params": list(range(4))}]}
    torch.save({"epoch": 800, "arch": "resnet50", "state_dict": state_dict, "optimizer": optimizer}, path)
    return path


def assert_state_equals(model: torch.nn.Module, expected: dict[str, Tensor]) -> None:
    state = model.state_dict()
    assert set(state) == set(expected)
    for key, value in expected.items():
        assert torch.equal(state[key], value), key


def partition(segment_map: np.ndarray) -> SegmentPartition:
    """Segments of one patch are noise."""
    sizes = np.bincount(segment_map.ravel()).astype(np.int32)
    return SegmentPartition(segment_map.astype(np.int32), sizes, sizes <= 1)


MAPS = [
    np.array([[0, 0, 1, 1], [0, 2, 2, 1], [3, 3, 2, 1], [3, 3, 1, 4]]),
    np.array([[0, 0, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 0, 0]]),
]
"""Two 4 x 4 patch grids (32 px, patch 8): 4 + 2 valid segments, one noise segment."""


def manual_crops(module: DatusModule, images: Tensor, size: int) -> Tensor:
    """The masked crops of the valid segments of :data:`MAPS`, in [0, 1], at ``size``."""
    valid = torch.from_numpy(np.stack([np.where(m == 4, -1, m) for m in MAPS]))
    masks, image_index = segment_masks(valid, torch.tensor([4, 2]))
    pixels = images * module.std + module.mean
    return masked_crops(pixels, masks, image_index, module.patch_size, "fit", size)


def embed_with(module: DatusModule, images: Tensor) -> Tensor:
    with torch.no_grad():
        return module.embed_segments(images, [partition(m) for m in MAPS])


# ----------------------------------------------------------------------------- MoCo v2 checkpoints


@pytest.mark.parametrize("name", ["resnet10t", "resnet18"])
def test_moco_v2_checkpoint_loads_exactly(tmp_path: Path, name: str) -> None:
    """The query encoder loads bit for bit; its MLP head, the key encoder and the queue are left out."""
    encoder = random_state(name)
    path = write_moco_v2(tmp_path / "moco_v2_800ep_pretrain.pth.tar", encoder)
    model = build_embedder(name, str(path))
    load_frozen_weights(model, name, str(path), EMBEDDER)
    assert_state_equals(model, encoder)
    assert not any(key.startswith("fc.") for key in model.state_dict())
    assert not model.training and not any(parameter.requires_grad for parameter in model.parameters())


def test_moco_v2_checkpoint_from_the_cli_options(tmp_path: Path) -> None:
    """``--model.embedder_weights FILE`` loads the file into the embedder and records its resolved path."""
    encoder = random_state("resnet10t")
    path = write_moco_v2(tmp_path / "moco.pth.tar", encoder)
    module = build(embedder="resnet10t", embedder_weights=str(path))
    assert module.embedder is not None
    assert_state_equals(module.embedder, encoder)
    assert module.describe()["embedder_weights"] == str(path.resolve())


def test_moco_checkpoint_of_another_resnet_lists_keys_and_names_the_options(tmp_path: Path) -> None:
    """A resnet18 file for a resnet10t embedder: both sides of the mismatch, and the embedder's options."""
    path = write_moco_v2(tmp_path / "moco_resnet18.pth.tar", random_state("resnet18"))
    with pytest.raises(WeightsError) as caught:
        build(embedder="resnet10t", embedder_weights=str(path))
    message = str(caught.value)
    assert "missing keys ['conv1.0.weight'" in message
    assert "unexpected keys ['conv1.weight', 'layer1.1.bn1.bias'" in message
    assert "--model.embedder " in message and "--model.embedder_weights" in message
    assert "--model.backbone" not in message and "--model.weights" not in message
    assert "\n" not in message


def test_missing_embedder_file_names_embedder_weights(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "moco_v2_800ep_pretrain.pth.tar"
    with pytest.raises(WeightsError) as caught:
        build(embedder="resnet10t", embedder_weights=str(path))
    assert str(caught.value).startswith("--model.embedder_weights: no file at") and str(path) in str(caught.value)


def test_official_dino_embedder_offline_names_embedder_weights(offline_hub: Any) -> None:
    """A DINO name as embedder resolves the official file, and its failure names the embedder's option."""
    with pytest.raises(WeightsError) as caught:
        build(embedder="vit_small_patch8_224.dino")
    message = str(caught.value)
    assert "dino_deitsmall8_pretrain.pth" in message
    assert "--model.embedder_weights /path/to/dino_deitsmall8_pretrain.pth" in message
    assert "--model.embedder_weights random" in message and "--model.weights" not in message


def test_timm_pretrained_embedder_failure_names_embedder_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """No network for timm's weights: WeightsError naming --model.embedder_weights, never a random network."""
    real_create = timm.create_model

    def offline_create(name: str, pretrained: bool = False, **kwargs: Any) -> torch.nn.Module:
        if pretrained:
            raise OSError("offline: cannot reach huggingface.co")
        return real_create(name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", offline_create)
    with pytest.raises(WeightsError, match=r"--model\.embedder_weights PATH.*--model\.embedder_weights random"):
        build(embedder="resnet10t")


def test_random_embedder_weights_warn_once_naming_the_embedder(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="datus"):
        build(embedder="resnet10t", embedder_weights="random")
    messages = [r.getMessage() for r in caplog.records if "RANDOM WEIGHTS" in r.getMessage()]
    assert sum("segment embedder resnet10t" in message for message in messages) == 1


# ----------------------------------------------------------------------------- embeddings


def test_cnn_crop_embeddings_equal_manual_computation() -> None:
    """Crop at the CNN's own input size, normalise with its own mean/std, forward, average-pool, L2."""
    module = build(embedder="resnet10t", embedder_weights="random")
    assert module.crop_size == 176 and module.embedding_dim == 512
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    embeddings = embed_with(module, images)
    crops = manual_crops(module, images, 176)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    with torch.no_grad():
        feature_maps = module.embedder.forward_features((crops - mean) / std)  # type: ignore[union-attr]
    reference = F.normalize(feature_maps.mean(dim=(2, 3)), dim=-1)
    assert embeddings.shape == (6, 512)
    assert torch.allclose(embeddings, reference, atol=1e-5)


def test_vit_embedder_other_than_the_backbone_gives_its_cls_token() -> None:
    """A separate ViT (ImageNet mean/std, 224 px) embeds crops with its own CLS token, not the backbone's."""
    module = build(embedder="deit_tiny_patch16_224", embedder_weights="random")
    assert module.embedder is not None and module.embedder is not module.backbone
    assert module.crop_size == 224 and module.embedding_dim == 192
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    embeddings = embed_with(module, images)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    with torch.no_grad():
        tokens = module.embedder.forward_features((manual_crops(module, images, 224) - mean) / std)
    assert torch.allclose(embeddings, F.normalize(tokens[:, 0], dim=-1), atol=1e-5)


def test_whole_image_embedding_lives_in_the_embedder_space() -> None:
    """Images without valid segments are labelled from this embedding: same network, same width."""
    module = build(embedder="resnet10t", embedder_weights="random")
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        embedded = module.embed_whole_images(images)
        crops = masked_crops(images * module.std + module.mean, torch.ones(3, 4, 4, dtype=torch.bool),
                             torch.arange(3), 8, "fit", 176)
        mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
        reference = F.normalize(module.embedder.forward_features((crops - mean) / std).mean(dim=(2, 3)), dim=-1)  # type: ignore[union-attr]
    assert embedded.shape == (3, 512) and torch.allclose(embedded, reference, atol=1e-5)


def test_default_embedder_is_the_discovery_backbone() -> None:
    """Without --model.embedder nothing changes: the backbone's CLS of crops at the discovery size."""
    module = build()
    assert module.embedder is None and module.segment_embedder is module.backbone
    assert module.crop_size == 32 and module.embedding_dim == 48
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    embeddings = embed_with(module, images)
    with torch.no_grad():
        tokens = module.backbone.forward_features((manual_crops(module, images, 32) - module.mean) / module.std)
    assert torch.allclose(embeddings, F.normalize(tokens[:, 0], dim=-1), atol=1e-5)


# ----------------------------------------------------------------------------- configuration


def test_packed_with_a_separate_embedder_is_refused() -> None:
    with pytest.raises(ConfigurationError) as caught:
        build(embedding="packed", embedder="resnet10t", embedder_weights="random")
    message = str(caught.value)
    assert "--model.embedding packed" in message and "--model.embedder resnet10t" in message and "\n" not in message


def test_embedder_weights_without_embedder_is_refused() -> None:
    with pytest.raises(ConfigurationError, match=r"--model\.embedder_weights random needs --model\.embedder NAME"):
        build(embedder_weights="random")


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"embedder": "resnet_fifty"}, r"^--model\.embedder: unknown timm model 'resnet_fifty'"),
        ({"embedder": "resnet10t", "embedding": "packed"}, r"^--model\.embedding packed"),
    ],
)
def test_embedder_options_are_checked_before_any_weights_are_read(
    tmp_path: Path, settings: dict[str, Any], message: str
) -> None:
    """Weights files that do not exist are never reached: the option mistake is reported first."""
    missing = str(tmp_path / "missing.pth")
    with pytest.raises(ConfigurationError, match=message) as caught:
        DatusModule(backbone="vit_tiny_patch16_224", weights=missing, embedder_weights=missing, **settings)
    assert not isinstance(caught.value, WeightsError)


def test_run_identity_changes_with_the_embedder(tmp_path: Path) -> None:
    """A run folder refuses to resume with another embedder, and centroids do not cross embedders."""
    path = write_moco_v2(tmp_path / "moco.pth.tar", random_state("resnet10t"))
    identities = [
        build().describe(),
        build(embedder="resnet10t", embedder_weights="random").describe(),
        build(embedder="resnet10t", embedder_weights=str(path)).describe(),
    ]
    assert identities[0]["embedder"] is None and identities[0]["embedder_weights"] is None
    assert identities[1]["embedder"] == "resnet10t" and identities[1]["embedder_weights"] == "random"
    assert identities[1]["embedding_dim"] == 512 and identities[0]["embedding_dim"] == 48
    assert identities[2]["embedder_weights"] == str(path.resolve())
    for index, (old, new) in enumerate([(identities[0], identities[1]), (identities[1], identities[2])]):
        run = Run(tmp_path / f"run{index}")
        run.claim({"model": old, "data": None})
        with pytest.raises(ConfigurationError, match=r"model embedder"):
            run.claim({"model": new, "data": None})
    assert {"embedder", "embedder_weights"} <= set(EMBEDDING_IDENTITY)


# ----------------------------------------------------------------------------- the CLI


@pytest.mark.integration
def test_cli_run_with_a_moco_resnet_embedder_writes_masks(dataset: Path, tmp_path: Path) -> None:
    """``--model.embedder resnet10t --model.embedder_weights MOCO_FILE`` end to end; resuming without it is refused."""
    moco = write_moco_v2(tmp_path / "moco_v2.pth.tar", random_state("resnet10t"))
    output_dir = tmp_path / "run"
    predict(dataset, output_dir, "--model.embedder", "resnet10t", "--model.embedder_weights", str(moco))
    model = json.loads((output_dir / "run.json").read_text())["identity"]["model"]
    assert model["embedder"] == "resnet10t" and model["embedder_weights"] == str(moco.resolve())
    assert model["embedding_dim"] == 512
    records = records_of(output_dir)
    assert records and all(r.embeddings.shape[1:] == (512,) and r.image_embedding.shape == (512,) for r in records)
    for image_id in image_ids(dataset):
        assert read_label_png(output_dir / "masks" / f"{image_id}.png").max() < 3
    with pytest.raises(ConfigurationError, match=r"model embedder: was 'resnet10t', now None"):
        predict(dataset, output_dir)
