"""Tests of datus.discovery.backbones: weight formats, weight failures, the official DINO path, the key hook.

Every checkpoint is written by the test itself (no download can happen: the ``offline_hub``
fixture replaces ``torch.hub.download_url_to_file`` and the hub cache). Networks are tiny random
ViTs, so the whole module runs in seconds.
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

import datus.discovery.backbones as backbones
from datus.discovery.backbones import (
    OFFICIAL_DINO_CHECKPOINTS,
    LastBlockKeys,
    OfficialCheckpoint,
    WeightsError,
    create_backbone,
    normalization_of,
    pooled_features,
    pooled_output,
)

TINY = "vit_tiny_patch16_224"
TINY_KW: dict[str, Any] = {"depth": 2, "embed_dim": 48, "num_heads": 2, "patch_size": 8}
DINO_S8 = "vit_small_patch8_224.dino"
SMALL_DINO_KW: dict[str, Any] = {"depth": 1, "embed_dim": 48, "num_heads": 2}
"""Shrinks the DINO architecture: the official-weights path fails before any weight is loaded."""


def random_state_like(model: nn.Module, seed: int = 7) -> dict[str, Tensor]:
    """A state dict with the model's keys and shapes and fresh random values (not its init)."""
    generator = torch.Generator().manual_seed(seed)
    return {key: torch.randn(value.shape, generator=generator) for key, value in model.state_dict().items()}


def assert_state_equals(model: nn.Module, expected: dict[str, Tensor]) -> None:
    """Every tensor of ``model`` equals ``expected`` bit for bit, with the same key set."""
    state = model.state_dict()
    assert set(state) == set(expected)
    for key, value in expected.items():
        assert torch.equal(state[key], value), key


def load_tiny(weights: str | Path, **overrides: Any) -> tuple[nn.Module, str]:
    """``create_backbone`` on the tiny architecture with ``weights``."""
    return create_backbone(TINY, str(weights), **{**TINY_KW, **overrides})


@pytest.fixture
def saved_state(tiny_vit: Callable[..., nn.Module]) -> dict[str, Tensor]:
    """Random weights for the tiny architecture that no fresh model can have by chance."""
    return random_state_like(tiny_vit())


# ----------------------------------------------------------------------------- formats


def test_official_dino_format_loads_exactly(tmp_path: Path, saved_state: dict[str, Tensor]) -> None:
    """A plain state dict with timm key names (the official DINO .pth layout) loads bit for bit."""
    path = tmp_path / "dino_tiny_pretrain.pth"
    torch.save(saved_state, path)
    model, source = load_tiny(path)
    assert_state_equals(model, saved_state)
    assert source == str(path)
    assert not model.training
    assert not any(parameter.requires_grad for parameter in model.parameters())


@pytest.mark.parametrize("prefix", ["module.backbone.", "backbone."])
def test_dino_training_checkpoint_uses_teacher_and_drops_head(
    tmp_path: Path, saved_state: dict[str, Tensor], prefix: str
) -> None:
    """A full DINO training checkpoint loads its teacher backbone: prefixes stripped, head dropped."""
    head = {
        f"{prefix.replace('backbone.', '')}head.mlp.0.weight": torch.randn(8, 48),
        f"{prefix.replace('backbone.', '')}head.last_layer.weight_g": torch.randn(16, 1),
    }
    teacher = {prefix + key: value for key, value in saved_state.items()} | head
    student = {prefix + key: value + 1.0 for key, value in saved_state.items()} | head
    path = tmp_path / "checkpoint.pth"
    torch.save({"teacher": teacher, "student": student, "epoch": 3, "optimizer": {"lr": 0.1}}, path)
    model, _ = load_tiny(path)
    assert_state_equals(model, saved_state)


def test_safetensors_loads_exactly(tmp_path: Path, saved_state: dict[str, Tensor]) -> None:
    """A .safetensors file with timm key names loads bit for bit."""
    path = tmp_path / "weights.safetensors"
    save_file(saved_state, str(path))
    model, source = load_tiny(path)
    assert_state_equals(model, saved_state)
    assert source == str(path)


@pytest.mark.parametrize("wrapper", ["state_dict", "model"])
def test_wrapped_state_dict_loads_exactly(tmp_path: Path, saved_state: dict[str, Tensor], wrapper: str) -> None:
    """``{"state_dict": ...}`` (Lightning style) and ``{"model": ...}`` wrappers are unwrapped."""
    path = tmp_path / "wrapped.ckpt"
    torch.save({wrapper: saved_state, "epoch": 3}, path)
    model, _ = load_tiny(path)
    assert_state_equals(model, saved_state)


def test_loaded_network_computes_what_an_initialised_one_loaded_with_copies_computes(
    tmp_path: Path, saved_state: dict[str, Tensor], tiny_vit: Callable[..., nn.Module]
) -> None:
    """Built without initialisation then loaded: no tensor left on the meta device, same outputs."""
    path = tmp_path / "weights.pth"
    torch.save(saved_state, path)
    model, _ = load_tiny(path)
    assert not any(tensor.is_meta for tensor in [*model.parameters(), *model.buffers()])
    initialised = tiny_vit()
    initialised.load_state_dict(saved_state)
    images = torch.randn(2, 3, 32, 48)
    assert torch.equal(model(images), initialised.eval()(images))


def test_half_precision_checkpoint_loads_into_float32_parameters(
    tmp_path: Path, saved_state: dict[str, Tensor]
) -> None:
    """A checkpoint saved in float16 gives the float32 network its values, as a copying load would."""
    half = {key: value.half() for key, value in saved_state.items()}
    path = tmp_path / "half.pth"
    torch.save(half, path)
    model, _ = load_tiny(path)
    assert {parameter.dtype for parameter in model.parameters()} == {torch.float32}
    assert_state_equals(model, {key: value.float() for key, value in half.items()})


def test_network_with_computed_buffers_is_initialised_before_loading(tmp_path: Path) -> None:
    """RoPE tables are not in checkpoints: a DINOv3 (Eva) network is built normally, then loaded."""
    name, options = "vit_small_patch16_dinov3.lvd1689m", {"depth": 1, "embed_dim": 48, "num_heads": 2}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference, _ = create_backbone(name, "random", **options)
    state = random_state_like(reference)
    reference.load_state_dict(state)
    path = tmp_path / "dinov3.pth"
    torch.save(state, path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, _ = create_backbone(name, str(path), **options)
    images = torch.randn(1, 3, 64, 64)
    assert torch.equal(model.forward_features(images), reference.forward_features(images))


def test_home_relative_path_is_expanded(
    tmp_path: Path, saved_state: dict[str, Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``~/weights.pth`` resolves against the home folder, as a shell user expects."""
    monkeypatch.setenv("HOME", str(tmp_path))
    torch.save(saved_state, tmp_path / "weights.pth")
    model, _ = load_tiny("~/weights.pth")
    assert_state_equals(model, saved_state)


# ----------------------------------------------------------------------------- failures


def test_checkpoint_of_deeper_architecture_lists_unexpected_keys(
    tmp_path: Path, tiny_vit: Callable[..., nn.Module]
) -> None:
    """Extra blocks in the file are named in the WeightsError instead of being ignored."""
    path = tmp_path / "deeper.pth"
    torch.save(random_state_like(tiny_vit(depth=3)), path)
    with pytest.raises(WeightsError) as caught:
        load_tiny(path)
    message = str(caught.value)
    assert "unexpected keys" in message and "blocks.2.attn.qkv.weight" in message
    assert "--model.backbone" in message


def test_checkpoint_of_shallower_architecture_lists_missing_keys(
    tmp_path: Path, tiny_vit: Callable[..., nn.Module]
) -> None:
    """Blocks missing from the file are named in the WeightsError (strict loading)."""
    path = tmp_path / "shallower.pth"
    torch.save(random_state_like(tiny_vit(depth=1)), path)
    with pytest.raises(WeightsError, match=r"missing keys \[.*'blocks\.1\.attn\.qkv\.bias'"):
        load_tiny(path)


def test_checkpoint_of_a_cnn_is_rejected(tmp_path: Path) -> None:
    """A ResNet checkpoint gives WeightsError listing both sides of the mismatch."""
    path = tmp_path / "resnet.pth"
    torch.save(timm.create_model("resnet10t", pretrained=False).state_dict(), path)
    with pytest.raises(WeightsError, match=r"missing keys \['blocks\.0\..*unexpected keys \['bn1\."):
        load_tiny(path)


def test_patch_size_mismatch_is_a_weights_error(tmp_path: Path, tiny_vit: Callable[..., nn.Module]) -> None:
    """A patch-16 checkpoint for a patch-8 model fails on pos_embed with a clear message."""
    path = tmp_path / "patch16.pth"
    torch.save(random_state_like(tiny_vit(patch_size=16)), path)
    with pytest.raises(WeightsError, match=r"pos_embed has shape \(1, 197, 48\).*\(1, 785, 48\).*patch size"):
        load_tiny(path)


def test_same_keys_other_shapes_is_a_weights_error(tmp_path: Path, tiny_vit: Callable[..., nn.Module]) -> None:
    """Same key names but another MLP width raise WeightsError, not torch's bare RuntimeError."""
    path = tmp_path / "mlp2.pth"
    torch.save(random_state_like(tiny_vit(mlp_ratio=2.0)), path)
    with pytest.raises(WeightsError, match=r"(?s)mlp\.fc1\.weight.*--model\.backbone"):
        load_tiny(path)


def test_truncated_checkpoint_names_the_path(tmp_path: Path, saved_state: dict[str, Tensor]) -> None:
    """A half-written .pth raises WeightsError that names the file (so the user can delete it)."""
    path = tmp_path / "truncated.pth"
    torch.save(saved_state, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match=str(path)):
        load_tiny(path)


@pytest.mark.parametrize("name", ["garbage.pth", "garbage.safetensors"])
def test_corrupted_checkpoint_names_the_path(tmp_path: Path, name: str) -> None:
    """Random bytes, as .pth or .safetensors, raise WeightsError naming the file."""
    path = tmp_path / name
    path.write_bytes(bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0)).tolist()))
    with pytest.raises(WeightsError, match=str(path)):
        load_tiny(path)


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        ([torch.zeros(2)], "expected a dict of tensors, got list"),
        (torch.zeros(2), "expected a dict of tensors, got Tensor"),
        ({"epoch": 3, "args": "lr=0.1"}, "holds no tensors"),
    ],
)
def test_checkpoint_that_is_not_a_dict_of_tensors(tmp_path: Path, payload: object, expected: str) -> None:
    """Files holding a list, a bare tensor or no tensors at all raise WeightsError saying so."""
    path = tmp_path / "odd.pth"
    torch.save(payload, path)
    with pytest.raises(WeightsError, match=expected):
        load_tiny(path)


def test_missing_file_names_the_flag(tmp_path: Path) -> None:
    """A path that does not exist raises WeightsError naming --model.weights and the path."""
    path = tmp_path / "nowhere" / "dino.pth"
    with pytest.raises(WeightsError) as caught:
        load_tiny(path)
    assert "--model.weights" in str(caught.value) and str(path) in str(caught.value)


def test_unknown_backbone_names_the_flag() -> None:
    """A misspelt timm name raises ValueError naming --model.backbone."""
    with pytest.raises(ValueError, match=r"--model\.backbone.*vit_smol_patch8_224"):
        create_backbone("vit_smol_patch8_224", "random")


def test_backbone_without_qkv_is_rejected() -> None:
    """A CNN is refused before any weight handling: datus needs attn.qkv in the last block."""
    with pytest.raises(ValueError, match=r"--model\.backbone.*qkv"):
        create_backbone("resnet10t", "random")


# ----------------------------------------------------------------------------- official / pretrained


def test_official_dino_without_network_names_file_and_flag(offline_hub: Any) -> None:
    """No network: the error names the official file, its URL and --model.weights; nothing random."""
    with pytest.raises(WeightsError) as caught:
        create_backbone(DINO_S8, "pretrained", **SMALL_DINO_KW)
    message = str(caught.value)
    assert "dino_deitsmall8_pretrain.pth" in message
    assert "--model.weights" in message and 'weights="random"' in message  # the CLI flag and the Python argument
    assert "https://dl.fbaipublicfiles.com/dino/dino_deitsmall8_pretrain/dino_deitsmall8_pretrain.pth" in message
    assert [url for url, _ in offline_hub.calls] == [OFFICIAL_DINO_CHECKPOINTS[DINO_S8].url]
    assert Path(offline_hub.calls[0][1]) == offline_hub.cache_dir / "dino_deitsmall8_pretrain.pth"


def test_official_dino_is_the_default_weights(offline_hub: Any) -> None:
    """Leaving ``weights`` out means the official weights (so it fails offline), never random ones."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a RANDOM WEIGHTS warning would fail here
        with pytest.raises(WeightsError, match="dino_deitsmall8_pretrain.pth"):
            create_backbone(DINO_S8, **SMALL_DINO_KW)


def test_cached_official_file_of_wrong_size_is_refused(offline_hub: Any) -> None:
    """A partial download in the hub cache is reported with both byte counts; nothing re-downloads."""
    offline_hub.cache_dir.mkdir(parents=True)
    cached = offline_hub.cache_dir / "dino_deitsmall8_pretrain.pth"
    cached.write_bytes(b"\0" * 1000)
    with pytest.raises(WeightsError, match=r"has 1000 bytes.*86728949"):
        create_backbone(DINO_S8, "pretrained", **SMALL_DINO_KW)
    assert offline_hub.calls == []


def _register_official(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, state: dict[str, Tensor], *, digest: str | None = None
) -> tuple[OfficialCheckpoint, bytes]:
    """Record the tiny architecture as an 'official' checkpoint whose file is ``state`` saved."""
    staging = tmp_path / "staging.pth"
    torch.save(state, staging)
    data = staging.read_bytes()
    checkpoint = OfficialCheckpoint(
        "https://example.invalid/tiny/dino_tiny_pretrain.pth",
        digest if digest is not None else hashlib.sha256(data).hexdigest(),
        len(data),
    )
    monkeypatch.setitem(backbones.OFFICIAL_DINO_CHECKPOINTS, TINY, checkpoint)
    return checkpoint, data


def test_official_file_in_cache_with_right_sha256_loads(
    offline_hub: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, saved_state: dict[str, Tensor]
) -> None:
    """A cached official file whose size and sha256 match loads exactly, without a download."""
    checkpoint, data = _register_official(monkeypatch, tmp_path, saved_state)
    offline_hub.cache_dir.mkdir(parents=True)
    (offline_hub.cache_dir / checkpoint.file_name).write_bytes(data)
    model, source = load_tiny("pretrained")
    assert_state_equals(model, saved_state)
    assert source == checkpoint.url
    assert offline_hub.calls == []


def test_official_file_is_downloaded_then_verified(
    offline_hub: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, saved_state: dict[str, Tensor]
) -> None:
    """When the cache is empty the file is downloaded into it once, verified, and loaded."""
    checkpoint, data = _register_official(monkeypatch, tmp_path, saved_state)
    offline_hub.serve[checkpoint.url] = data
    model, _ = load_tiny("pretrained")
    assert_state_equals(model, saved_state)
    assert (offline_hub.cache_dir / checkpoint.file_name).read_bytes() == data
    load_tiny("pretrained")
    assert len(offline_hub.calls) == 1


def test_official_file_with_wrong_sha256_is_refused(
    offline_hub: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, saved_state: dict[str, Tensor]
) -> None:
    """Same size, different content: the sha256 check catches it and names both digests."""
    checkpoint, data = _register_official(monkeypatch, tmp_path, saved_state, digest="0" * 64)
    offline_hub.cache_dir.mkdir(parents=True)
    (offline_hub.cache_dir / checkpoint.file_name).write_bytes(data)
    with pytest.raises(WeightsError, match=rf"sha256 {hashlib.sha256(data).hexdigest()} does not match.*{'0' * 64}"):
        load_tiny("pretrained")


def test_timm_pretrained_failure_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    """A non-DINO name whose timm download fails raises WeightsError, never a random network."""
    real_create = timm.create_model

    def offline_create(name: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
        if pretrained:
            raise OSError("offline: cannot reach huggingface.co")
        return real_create(name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", offline_create)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(WeightsError, match=r"--model\.weights PATH.*--model\.weights random"):
            load_tiny("pretrained")


def test_timm_pretrained_weights_are_loaded(monkeypatch: pytest.MonkeyPatch, saved_state: dict[str, Tensor]) -> None:
    """For a non-DINO name, the weights timm provides are the ones loaded (source 'timm:NAME')."""
    real_create = timm.create_model

    def fake_create(name: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
        model = real_create(name, pretrained=False, **{**kwargs, **TINY_KW})
        if pretrained:
            model.load_state_dict(saved_state)
        return model

    monkeypatch.setattr(timm, "create_model", fake_create)
    model, source = create_backbone(TINY, "pretrained")
    assert_state_equals(model, saved_state)
    assert source == f"timm:{TINY}"


def test_random_weights_warn_loudly_once(caplog: pytest.LogCaptureFixture) -> None:
    """``weights="random"`` works but says RANDOM WEIGHTS, once, without naming a CLI flag."""
    with caplog.at_level(logging.WARNING, logger="datus"), warnings.catch_warnings():
        warnings.simplefilter("error")  # no second copy as a Python warning
        _, source = load_tiny("random")
    assert source == "random"
    messages = [record.getMessage() for record in caplog.records if "RANDOM WEIGHTS" in record.getMessage()]
    assert len(messages) == 1 and "--model" not in messages[0]


def test_normalization_of_dino_is_imagenet() -> None:
    """DINO models are normalised with the ImageNet mean and std."""
    mean, std = normalization_of(DINO_S8)
    assert mean == pytest.approx((0.485, 0.456, 0.406))
    assert std == pytest.approx((0.229, 0.224, 0.225))


# ----------------------------------------------------------------------------- LastBlockKeys


def manual_last_qkv(model: nn.Module, images: Tensor) -> Tensor:
    """The last block's qkv output (B x T x 3D), recomputed step by step from the weights."""
    tokens = model.norm_pre(model._pos_embed(model.patch_embed(images)))
    for block in model.blocks[:-1]:
        tokens = block(tokens)
    last = model.blocks[-1]
    return F.linear(last.norm1(tokens), last.attn.qkv.weight, last.attn.qkv.bias)


def manual_keys_and_attention(
    model: nn.Module, images: Tensor, num_heads: int, num_prefix: int
) -> tuple[Tensor, Tensor]:
    """Patch keys (heads concatenated) and head-mean CLS attention over patches, head by head."""
    qkv = manual_last_qkv(model, images)
    batch, tokens, width = qkv.shape
    head_dim = width // (3 * num_heads)
    qkv = qkv.reshape(batch, tokens, 3, num_heads, head_dim)
    keys = torch.cat([qkv[:, num_prefix:, 1, head] for head in range(num_heads)], dim=-1)
    attention = torch.zeros(batch, tokens - num_prefix)
    for b in range(batch):
        for head in range(num_heads):
            scores = qkv[b, :, 1, head] @ qkv[b, 0, 0, head] / head_dim**0.5
            attention[b] += torch.softmax(scores, dim=0)[num_prefix:] / num_heads
    return keys, attention


def test_keys_and_cls_attention_match_manual_computation(tiny_vit: Callable[..., nn.Module]) -> None:
    """Hooked keys and CLS attention equal a by-hand recomputation of the last block."""
    torch.manual_seed(0)
    model = tiny_vit()
    hook = LastBlockKeys(model)
    images = torch.randn(2, 3, 32, 32)
    with hook.capture():
        model(images)
    keys, attention = hook.keys_and_attention()
    expected_keys, expected_attention = manual_keys_and_attention(model, images, num_heads=2, num_prefix=1)
    assert keys.shape == (2, 16, 48)
    assert attention.shape == (2, 16)
    torch.testing.assert_close(keys, expected_keys, atol=1e-5, rtol=0)
    torch.testing.assert_close(attention, expected_attention, atol=1e-5, rtol=0)
    sums = attention.sum(dim=-1)
    assert bool(((sums > 0) & (sums <= 1 + 1e-6)).all())  # the CLS-to-CLS share is left out


def test_cls_attention_equals_timm_attention_matrix(tiny_vit: Callable[..., nn.Module]) -> None:
    """CLS attention equals the matrix timm's own (unfused) attention computes, patch part, head mean."""
    model = tiny_vit()
    attention_module = model.blocks[-1].attn
    attention_module.fused_attn = False
    seen: list[Tensor] = []
    attention_module.attn_drop.register_forward_hook(lambda module, inputs, output: seen.append(output))
    hook = LastBlockKeys(model)
    images = torch.randn(3, 3, 24, 40)
    with hook.capture():
        model(images)
    _, attention = hook.keys_and_attention()
    (matrix,) = seen  # B x heads x T x T
    torch.testing.assert_close(attention, matrix[:, :, 0, 1:].mean(dim=1), atol=1e-5, rtol=0)


def test_hook_records_only_inside_capture(tiny_vit: Callable[..., nn.Module]) -> None:
    """Forwards outside capture() (e.g. crop embeddings) neither record nor overwrite keys."""
    model = tiny_vit()
    hook = LastBlockKeys(model)
    model(torch.randn(1, 3, 32, 32))
    with pytest.raises(RuntimeError, match="capture"):
        hook.keys_and_attention()

    first = torch.randn(1, 3, 32, 32)
    with hook.capture():
        model(first)
    model(torch.randn(4, 3, 16, 16))  # a crop batch after the captured pass
    keys, _ = hook.keys_and_attention()
    expected, _ = manual_keys_and_attention(model, first, num_heads=2, num_prefix=1)
    torch.testing.assert_close(keys, expected, atol=1e-5, rtol=0)
    assert len(model.blocks[-1].attn.qkv._forward_hooks) == 1


def test_non_square_input(tiny_vit: Callable[..., nn.Module]) -> None:
    """A 64x96 input gives N = 8*12 patch keys in row-major order (dynamic_img_size)."""
    model = tiny_vit()
    hook = LastBlockKeys(model)
    images = torch.randn(1, 3, 64, 96)
    with hook.capture():
        model(images)
    keys, attention = hook.keys_and_attention()
    assert keys.shape == (1, 8 * 12, 48)
    assert attention.shape == (1, 8 * 12)
    expected, _ = manual_keys_and_attention(model, images, num_heads=2, num_prefix=1)
    torch.testing.assert_close(keys, expected, atol=1e-5, rtol=0)


def test_register_tokens_are_excluded() -> None:
    """DINOv2 with 4 registers: the 1 + 4 prefix tokens are not patches (N = h*w only)."""
    model, _ = create_backbone("vit_small_patch14_reg4_dinov2", "random", depth=1, embed_dim=48, num_heads=2)
    hook = LastBlockKeys(model)
    images = torch.randn(2, 3, 56, 70)  # 4 x 5 patches of 14 px
    with hook.capture():
        model(images)
    keys, attention = hook.keys_and_attention()
    assert manual_last_qkv(model, images).shape[1] == 20 + 5
    assert keys.shape == (2, 20, 48)
    assert attention.shape == (2, 20)
    expected_keys, expected_attention = manual_keys_and_attention(model, images, num_heads=2, num_prefix=5)
    torch.testing.assert_close(keys, expected_keys, atol=1e-5, rtol=0)
    torch.testing.assert_close(attention, expected_attention, atol=1e-5, rtol=0)


def test_dinov3_rope_backbone_gives_patch_keys_without_prefix_tokens() -> None:
    """timm's DINOv3 ViTs are Eva models (RoPE, 4 registers): keys are taken before the rotation."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, _ = create_backbone("vit_small_patch16_dinov3.lvd1689m", "random", depth=1)
    hook = LastBlockKeys(model)
    with hook.capture():
        model.forward_features(torch.randn(2, 3, 64, 96))
    keys, attention = hook.keys_and_attention()
    assert hook.num_prefix_tokens == 5
    assert keys.shape == (2, 24, 384) and attention.shape == (2, 24)


@pytest.mark.parametrize(
    "variant",
    [
        {},  # DINO's ViT
        {"init_values": 0.5, "qk_norm": True},  # LayerScale and normalised queries and keys
        {"reg_tokens": 2, "no_embed_class": True},  # registers after the CLS token (DINOv2 style)
        {"global_pool": "avg"},  # no CLS pooling: the whole pass runs, as it should
    ],
)
def test_pooled_output_equals_the_full_pass_with_the_same_keys(variant: dict[str, Any]) -> None:
    """The last block computed for the CLS token only gives the full pass's CLS feature and keys."""
    torch.manual_seed(3)
    model = timm.create_model(TINY, pretrained=False, num_classes=0, dynamic_img_size=True, **TINY_KW, **variant).eval()
    with torch.no_grad():  # random LayerScale and norms, so that every part of the block matters
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    assert backbones.has_plain_last_block(model) == ("global_pool" not in variant)
    keys = LastBlockKeys(model)
    images = torch.randn(3, 3, 32, 48)
    with torch.no_grad():
        with keys.capture():
            full = pooled_features(model, model.forward_features(images))
        full_keys, full_attention = keys.keys_and_attention()
        with keys.capture():
            trimmed = pooled_output(model, images)
        trimmed_keys, trimmed_attention = keys.keys_and_attention()
    assert torch.equal(trimmed_keys, full_keys) and torch.equal(trimmed_attention, full_attention)
    assert trimmed.shape == full.shape and torch.allclose(trimmed, full, atol=1e-5)
