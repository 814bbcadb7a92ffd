"""Backbone and segment-embedder creation, weight resolution and the last-block key hook.

A backbone is any timm Vision Transformer with a fused ``qkv`` projection in its blocks (DINO,
DINOv2, most timm ViTs). A segment embedder is any timm model (a ViT, or a CNN such as the
MoCo v2 ResNet-50 of the original DatUS code). Both resolve their weights the same way, in
this order: an explicit local file, the official DINO release (checksummed, cached in the
torch hub cache), or timm's own pretrained source. Random weights are used only when asked
for with ``"random"``, and loudly: a pseudo mask made with a random network looks plausible
and is worthless.
"""

from __future__ import annotations

import difflib
import hashlib
import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from datus.core.errors import ConfigurationError
from datus.core.settings import RANDOM_WEIGHTS

log = logging.getLogger(__name__)


DEFAULT_WEIGHTS = "pretrained"
"""Value of ``weights`` that resolves the published weights for the backbone name."""

MOCO_QUERY_ENCODER = "module.encoder_q."
"""Key prefix of the network a MoCo (v1/v2) training checkpoint trains; the rest is training state."""


@dataclass(frozen=True)
class Role:
    """Which network a weights file is for, so that every message names the options the user set."""

    network: str
    model_option: str
    weights_option: str

    @property
    def weights_argument(self) -> str:
        """The same setting for a Python caller: ``DatusModule(weights=...)``."""
        return self.weights_option.removeprefix("--model.")


BACKBONE = Role("backbone", "--model.backbone", "--model.weights")
EMBEDDER = Role("segment embedder", "--model.embedder", "--model.embedder_weights")


@dataclass(frozen=True)
class OfficialCheckpoint:
    """A checkpoint published by the DINO authors."""

    url: str
    sha256: str | None
    num_bytes: int | None

    @property
    def file_name(self) -> str:
        return self.url.rsplit("/", 1)[-1]


def _dino_url(name: str) -> str:
    return f"https://dl.fbaipublicfiles.com/dino/{name}/{name}.pth"


OFFICIAL_DINO_CHECKPOINTS: dict[str, OfficialCheckpoint] = {
    "vit_small_patch8_224.dino": OfficialCheckpoint(
        _dino_url("dino_deitsmall8_pretrain"),
        "55c8b267f479b614ec20858947ce361ba804846c193e20be74263a096bb6d75e",
        86_728_949,
    ),
    "vit_small_patch16_224.dino": OfficialCheckpoint(_dino_url("dino_deitsmall16_pretrain"), None, None),
    "vit_base_patch8_224.dino": OfficialCheckpoint(_dino_url("dino_vitbase8_pretrain"), None, None),
    "vit_base_patch16_224.dino": OfficialCheckpoint(_dino_url("dino_vitbase16_pretrain"), None, None),
}
"""Official DINO files per timm name. A sha256 is verified where the project has one recorded."""


class WeightsError(ConfigurationError):
    """Weights could not be found, downloaded, verified or loaded; the message names the file and the fix."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _strip_prefixes(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Turn a training checkpoint's weights into plain timm weights of the trained network.

    DINO training checkpoints hold ``module.backbone.blocks.0...`` keys (DDP wrapper +
    MultiCropWrapper) and the projection ``head.*``, which is not part of the backbone. MoCo
    checkpoints hold the query encoder under ``module.encoder_q.`` with an ``fc.*`` projection
    head (an MLP in v2) that pretext training needed and embedding must not use, beside the key
    encoder and the queue.
    """
    if any(key.startswith(MOCO_QUERY_ENCODER) for key in state_dict):
        encoder = {
            key[len(MOCO_QUERY_ENCODER) :]: value for key, value in state_dict.items() if key.startswith(MOCO_QUERY_ENCODER)
        }
        return {key: value for key, value in encoder.items() if not key.startswith("fc.")}
    cleaned: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        for prefix in ("module.", "backbone."):
            if key.startswith(prefix):
                key = key[len(prefix) :]
        if key.startswith("head."):
            continue
        cleaned[key] = value
    return cleaned


def read_state_dict(path: Path, role: Role = BACKBONE) -> dict[str, Tensor]:
    """Read network weights from a local file in any supported format.

    Supported: the official DINO ``.pth`` (a plain state dict with timm's key names), a full
    DINO training checkpoint (weights under ``teacher`` or ``student`` with ``module.`` /
    ``backbone.`` prefixes and a ``head.*`` to drop), a MoCo v1/v2 training checkpoint
    (``{"state_dict": {"module.encoder_q.*": ...}}``, projection ``fc.*`` dropped), a
    ``{"state_dict": ...}`` or ``{"model": ...}`` wrapper, and ``.safetensors``.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(
            f"{role.weights_option}: no file at {path}. Give the path of a checkpoint of the {role.network}."
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return _strip_prefixes(load_file(str(path)))
        except Exception as error:
            raise WeightsError(f"{path}: not a readable safetensors file ({error}).") from error
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise WeightsError(
            f"{path}: could not be read as a torch checkpoint with weights_only=True ({error}). "
            "Re-download the file; if it is a pickled training checkpoint with custom objects, "
            "re-save its state dict with torch.save(model.state_dict(), path)."
        ) from error
    if not isinstance(payload, Mapping):
        raise WeightsError(f"{path}: expected a dict of tensors, got {type(payload).__name__}.")
    for wrapper in ("teacher", "state_dict", "model", "student"):
        if wrapper in payload and isinstance(payload[wrapper], Mapping):
            payload = payload[wrapper]
            break
    tensors = {key: value for key, value in payload.items() if isinstance(value, Tensor)}
    if not tensors:
        raise WeightsError(f"{path}: holds no tensors; is this a model checkpoint?")
    return _strip_prefixes(tensors)


def load_state_dict_strict(
    model: nn.Module, state_dict: Mapping[str, Tensor], source: str, role: Role = BACKBONE
) -> None:
    """Load with ``strict=True`` semantics and an error that lists what did not match."""
    own = model.state_dict()
    expected = set(own)
    given = set(state_dict)
    missing, unexpected = sorted(expected - given), sorted(given - expected)
    if missing or unexpected:
        raise WeightsError(
            f"weights from {source} do not match the {role.network}: missing keys {missing[:10]}"
            f"{' ...' if len(missing) > 10 else ''} ({len(missing)} in all), unexpected keys "
            f"{unexpected[:10]}{' ...' if len(unexpected) > 10 else ''} ({len(unexpected)} in all). "
            f"Check that {role.model_option} names the architecture the checkpoint was trained with, or give "
            f"another file with {role.weights_option}."
        )
    state_dict = dict(state_dict)
    own_pos_embed = own.get("pos_embed")
    if own_pos_embed is not None and state_dict["pos_embed"].shape != own_pos_embed.shape:
        raise WeightsError(
            f"weights from {source}: pos_embed has shape {tuple(state_dict['pos_embed'].shape)}, the "
            f"{role.network} expects {tuple(own_pos_embed.shape)}. Check the patch size in {role.model_option}."
        )
    skeleton = any(tensor.is_meta for tensor in own.values())
    if skeleton:  # built without storage (_create_model): adopt the tensors, in the model's dtypes
        state_dict = {key: value.to(own[key].dtype).contiguous() for key, value in state_dict.items()}
    try:
        model.load_state_dict(state_dict, strict=True, assign=skeleton)
    except RuntimeError as error:  # same keys, other shapes (embed_dim, mlp_ratio, ...)
        raise WeightsError(
            f"weights from {source} do not fit the {role.network} ({' '.join(str(error).split())}). Check that "
            f"{role.model_option} "
            "names the architecture the checkpoint was trained with."
        ) from error


def hub_cache_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def _fetch_official(name: str, checkpoint: OfficialCheckpoint, role: Role) -> Path:
    """Return the cached official file, downloading and verifying it if needed."""
    destination = hub_cache_dir() / checkpoint.file_name
    if not destination.is_file():
        destination.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(checkpoint.url, str(destination), progress=True)
        except Exception as error:
            raise WeightsError(
                f"could not download the official weights of {name} from {checkpoint.url} ({error}). "
                f"On a machine without internet, download that file elsewhere and either put it at "
                f"{destination} or pass {role.weights_option} /path/to/{checkpoint.file_name} (in Python: "
                f"{role.weights_argument}=\"/path/to/{checkpoint.file_name}\"). For a smoke test without real weights "
                f"pass {role.weights_option} {RANDOM_WEIGHTS} ({role.weights_argument}=\"{RANDOM_WEIGHTS}\")."
            ) from error
    if checkpoint.num_bytes is not None and destination.stat().st_size != checkpoint.num_bytes:
        raise WeightsError(
            f"{destination} has {destination.stat().st_size} bytes, the official {checkpoint.file_name} "
            f"has {checkpoint.num_bytes}: the download is incomplete or the file is not the official "
            "one. Delete it and run again."
        )
    if checkpoint.sha256 is not None:
        actual = sha256_of(destination)
        if actual != checkpoint.sha256:
            raise WeightsError(
                f"{destination}: sha256 {actual} does not match the official {checkpoint.sha256}. "
                "Delete the file and run again."
            )
    return destination


def describe_weights(backbone: str, weights: str) -> str:
    """Where the weights of ``weights`` come from, without reading them (recorded in ``run.json``)."""
    if weights == RANDOM_WEIGHTS:
        return RANDOM_WEIGHTS
    if weights != DEFAULT_WEIGHTS:
        return str(Path(os.path.expanduser(weights)).resolve())
    official = OFFICIAL_DINO_CHECKPOINTS.get(backbone)
    return official.url if official is not None else f"timm:{backbone}"


def load_weights(model: nn.Module, backbone: str, weights: str, role: Role = BACKBONE) -> None:
    """Load weights into ``model``.

    Args:
        model: the timm model built for ``backbone``.
        backbone: the timm name (decides which official checkpoint applies).
        weights: a file path, ``"pretrained"`` (official DINO file or timm's source), or
            ``"random"`` (no loading, one loud warning).
        role: which network this is; only the wording of messages depends on it.
    """
    if weights == RANDOM_WEIGHTS:
        log.warning(
            "RANDOM WEIGHTS: %s %s is untrained (weights=%r). Segments and pseudo masks of this run are "
            "meaningless; use it only for smoke tests.",
            role.network,
            backbone,
            RANDOM_WEIGHTS,
        )
        return
    if weights != DEFAULT_WEIGHTS:
        path = Path(os.path.expanduser(weights))
        load_state_dict_strict(model, read_state_dict(path, role), str(path), role)
        return
    official = OFFICIAL_DINO_CHECKPOINTS.get(backbone)
    if official is not None:
        path = _fetch_official(backbone, official, role)
        load_state_dict_strict(model, read_state_dict(path, role), official.url, role)
        return
    try:
        pretrained = timm.create_model(backbone, pretrained=True, num_classes=0)
    except Exception as error:
        raise WeightsError(
            f"could not fetch timm's pretrained weights for {backbone} ({error}). Without internet, "
            f"pass a local file with {role.weights_option} PATH (in Python: {role.weights_argument}=PATH; a state dict "
            f"or .safetensors with timm's key names), or {role.weights_option} {RANDOM_WEIGHTS} for a smoke test."
        ) from error
    load_state_dict_strict(model, pretrained.state_dict(), f"timm:{backbone}", role)


def create_backbone(backbone: str, weights: str = DEFAULT_WEIGHTS, **overrides: object) -> tuple[nn.Module, str]:
    """Build a frozen timm ViT in eval mode and load its weights.

    Returns:
        The model and a description of where its weights came from.
    """
    model = build_backbone(backbone, weights, **overrides)
    load_frozen_weights(model, backbone, weights)
    return model, describe_weights(backbone, weights)


def load_frozen_weights(model: nn.Module, backbone: str, weights: str, role: Role = BACKBONE) -> None:
    """Load weights (see :func:`load_weights`), then freeze the model in eval mode."""
    load_weights(model, backbone, weights, role)
    model.eval().requires_grad_(False)


def build_backbone(backbone: str, weights: str, **overrides: object) -> nn.Module:
    """The timm ViT architecture for ``weights``, which :func:`load_weights` loads separately.

    Split from loading so that configuration mistakes surface before any file is read or
    downloaded (see :func:`_create_model` for what ``weights`` changes). ``dynamic_img_size``
    lets one model take any input size divisible by the patch size (the positional embeddings
    are interpolated). ``overrides`` are passed to ``timm.create_model`` (e.g. ``depth`` and
    ``embed_dim`` for tiny test networks).
    """
    examples = "a timm ViT name such as 'vit_small_patch8_224.dino' or 'vit_small_patch14_dinov2.lvd142m'"
    _require_timm_model(backbone, BACKBONE, examples, "*dino*")
    try:
        model = _create_model(backbone, weights, num_classes=0, dynamic_img_size=True, **overrides)
    except TypeError as error:  # CNNs and other non-ViT models reject dynamic_img_size
        raise ConfigurationError(
            f"--model.backbone: {backbone!r} could not be built as a ViT ({error}); datus needs a timm "
            "ViT whose blocks have attn.qkv (DINO, DINOv2 and most timm ViTs do)."
        ) from error
    if not hasattr(model, "blocks") or not hasattr(model.blocks[-1], "attn") or not hasattr(
        model.blocks[-1].attn, "qkv"
    ):
        raise ConfigurationError(
            f"--model.backbone: {backbone!r} has no fused qkv projection in its last block; datus needs "
            "a ViT whose blocks have attn.qkv (DINO, DINOv2 and most timm ViTs do)."
        )
    return model


def _require_timm_model(name: str, role: Role, examples: str, pattern: str) -> None:
    """Refuse a misspelt model name or pretrained tag in one line naming the nearest valid one."""
    architecture, _, tag = name.partition(".")
    if timm.is_model(architecture) and (not tag or name in timm.list_pretrained(f"{architecture}.*")):
        return
    candidates = timm.list_pretrained(f"{architecture}.*") if timm.is_model(architecture) else timm.list_models() + timm.list_pretrained()
    nearest = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    what = f"no pretrained tag {tag!r} for {architecture}" if timm.is_model(architecture) else f"unknown timm model {name!r}"
    hint = f"did you mean {nearest[0]!r}? " if nearest else ""
    raise ConfigurationError(
        f"{role.model_option}: {what}; {hint}Use {examples} "
        f"(python -c \"import timm; print(timm.list_models('{pattern}', pretrained=True))\")."
    )


def build_embedder(embedder: str, weights: str) -> nn.Module:
    """A timm model for segment embedding for ``weights``, which :func:`load_weights` loads separately.

    Built with ``num_classes=0`` so that it holds no classifier and its pooled output is the
    feature itself. Any architecture works (ViT, ResNet, ConvNeXt, ...): it only sees crops.
    """
    _require_timm_model(embedder, EMBEDDER, "a timm model name such as 'resnet50' or 'vit_base_patch8_224.dino'", "resnet*")
    return _create_model(embedder, weights, num_classes=0)


def _create_model(name: str, weights: str, **options: object) -> nn.Module:
    """``timm.create_model`` that skips the random initialisation which loaded weights replace.

    Initialising parameters only to overwrite them costs 0.2 s for a ViT-S and 1 s for a ViT-B
    on a CPU. Unless ``weights`` asks for a random network, the model is built on the meta
    device (shapes, no storage) and :func:`load_state_dict_strict` gives it the checkpoint's
    tensors. A model with buffers that no checkpoint holds (RoPE tables computed at
    construction) is built normally, since those buffers must be computed.
    """
    if weights != RANDOM_WEIGHTS:
        with torch.device("meta"):
            skeleton = timm.create_model(name, pretrained=False, **options)
        if set(dict(skeleton.named_buffers())) <= set(skeleton.state_dict()):
            return skeleton
    return timm.create_model(name, pretrained=False, **options)


def has_cls_token(model: nn.Module) -> bool:
    """Whether the model's first output token is a CLS token (timm ViTs with a class token)."""
    return getattr(model, "cls_token", None) is not None


def embedding_dim_of(model: nn.Module) -> int:
    """Width of :func:`embed`'s output for ``model`` (CLS token, else the pooled pre-logits feature)."""
    if has_cls_token(model):
        return int(model.num_features)
    return int(getattr(model, "head_hidden_size", model.num_features))


def pooled_features(model: nn.Module, features: Tensor) -> Tensor:
    """One vector per input from ``forward_features``' output, not yet normalised.

    The CLS token where the network has one (the DINO protocol, and what DatUS embeds with),
    else the network's own global pooling (``forward_head`` without the classifier): a CNN has
    no token to pick.
    """
    return features[:, 0] if has_cls_token(model) else model.forward_head(features, pre_logits=True)


def pooled_output(model: nn.Module, inputs: Tensor) -> Tensor:
    """:func:`pooled_features` of a whole pass, with the last block computed for the CLS token only.

    Of the last block only the keys and values of every token (which the key hook records in
    the discovery pass) and the CLS token's output are needed, so on a standard timm ViT the
    patch tokens' queries, attention outputs and MLP are never computed: about 6 % of a 12-block
    ViT's pass. The CLS feature equals the full pass's up to float rounding. Other networks run
    in full.
    """
    if not has_plain_last_block(model):
        return pooled_features(model, model.forward_features(inputs))
    tokens = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(inputs))))
    for block in model.blocks[:-1]:
        tokens = block(tokens)
    return model.norm(last_block_head(model.blocks[-1], tokens, 1))[:, 0]


def last_block_head(block: nn.Module, tokens: Tensor, count: int, attn_mask: Tensor | None = None) -> Tensor:
    """``block(tokens, attn_mask=attn_mask)[:, :count]`` of a plain timm ViT block, computing the
    outputs of the first ``count`` tokens only (see :func:`has_plain_last_block`).

    Every token's keys and values are computed (through ``attn.qkv``, so a key hook sees them);
    queries, attention, projection and MLP only for the leading tokens.
    """
    attention = block.attn
    batch, length, _ = tokens.shape
    qkv = attention.qkv(block.norm1(tokens)).reshape(batch, length, 3, attention.num_heads, attention.head_dim)
    queries, keys, values = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    queries, keys = attention.q_norm(queries[:, :, :count]), attention.k_norm(keys)
    mask = None if attn_mask is None else attn_mask[..., :count, :]
    attended = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask).transpose(1, 2)
    head = tokens[:, :count] + block.ls1(attention.proj(attention.norm(attended.reshape(batch, count, -1))))
    return head + block.ls2(block.mlp(block.norm2(head)))


def has_plain_last_block(model: nn.Module) -> bool:
    """Whether the model is a timm ViT pooled by its CLS token whose last block is timm's plain
    ``Block`` and ``Attention``, so that :func:`last_block_head` computes exactly what it does."""
    from timm.layers import Attention
    from timm.models.vision_transformer import Block, VisionTransformer

    if type(model) is not VisionTransformer or not has_cls_token(model) or model.global_pool != "token":
        return False
    block = model.blocks[-1]
    return type(block) is Block and type(block.attn) is Attention and block.attn.gate is None


def embed(model: nn.Module, inputs: Tensor) -> Tensor:
    """L2-normalised embeddings (float32) of normalised ``inputs`` with ``model``."""
    return F.normalize(pooled_output(model, inputs).float(), dim=-1)


def embedder_input_of(model: nn.Module) -> tuple[int, tuple[float, float, float], tuple[float, float, float]]:
    """Input side, mean and std that a built segment embedder was trained with (its pretrained config).

    The side is the model's default input size (e.g. 224 for ``resnet50``), which segment crops
    are resized to: a model sees objects at the scale it was trained on.
    """
    config = timm.data.resolve_model_data_config(model)
    _, height, width = config["input_size"]
    if height != width:
        raise ConfigurationError(
            f"{EMBEDDER.model_option}: its default input is {height}x{width}; segment crops are square, "
            "choose a model with a square input."
        )
    return int(height), tuple(config["mean"]), tuple(config["std"])  # type: ignore[return-value]


def patch_size_of(model: nn.Module) -> int:
    size = model.patch_embed.patch_size
    height, width = (size, size) if isinstance(size, int) else size
    if height != width:
        raise ValueError(f"non-square patches {height}x{width} are not supported")
    return int(height)


def normalization_of(backbone: str) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Mean and std the backbone was trained with, from timm's config, without building it."""
    config = timm.models.get_pretrained_cfg(backbone)
    mean = tuple(config.mean) if config is not None and config.mean else (0.485, 0.456, 0.406)
    std = tuple(config.std) if config is not None and config.std else (0.229, 0.224, 0.225)
    return mean, std  # type: ignore[return-value]


class LastBlockKeys:
    """Captures the last block's keys and CLS attention from one hook on its qkv projection.

    The hook is registered once for the model's lifetime and records only while ``capture()`` is
    active, so the crop-embedding passes through the same network do not overwrite it.
    """

    def __init__(self, model: nn.Module) -> None:
        attention = model.blocks[-1].attn
        self.num_heads: int = attention.num_heads
        self.scale: float = attention.head_dim**-0.5 if hasattr(attention, "head_dim") else 1.0
        self.num_prefix_tokens: int = getattr(model, "num_prefix_tokens", 1)
        self._active = False
        self._qkv: Tensor | None = None
        attention.qkv.register_forward_hook(self._record)

    def _record(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        if self._active:
            self._qkv = output

    @contextmanager
    def capture(self) -> Iterator[None]:
        self._active, self._qkv = True, None
        try:
            yield
        finally:
            self._active = False

    def keys_and_attention(self) -> tuple[Tensor, Tensor]:
        """Return the patch keys (B x N x D, heads concatenated) and CLS attention (B x N).

        The CLS-to-patch attention is the softmax over all tokens of the last block, averaged
        over heads; it is kept for visualisation only.
        """
        if self._qkv is None:
            raise RuntimeError("no forward pass was captured; call the backbone inside capture()")
        batch, tokens, width = self._qkv.shape
        qkv = self._qkv.reshape(batch, tokens, 3, self.num_heads, width // (3 * self.num_heads))
        queries, keys = qkv[:, :, 0].float(), qkv[:, :, 1].float()
        patch_keys = keys[:, self.num_prefix_tokens :].flatten(2)
        logits = torch.einsum("bhd,bthd->bht", queries[:, 0], keys) * self.scale
        cls_attention = logits.softmax(dim=-1)[:, :, self.num_prefix_tokens :].mean(dim=1)
        self._qkv = None
        return patch_keys, cls_attention
