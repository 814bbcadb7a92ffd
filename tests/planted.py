"""A ViT whose weights are set by hand, and scenes whose right answer is known (test infrastructure).

With random weights every end-to-end test passes whatever the masks look like, so a geometry bug
shared by the whole pipeline (a mask painted one patch off, an EXIF-rotated image scored against
an unrotated mask, two labels swapped between the fit and the painting) would go unnoticed. Here
the network is built so that segment discovery and segment embedding both see one thing: the
colour of each patch. Scenes are flat colour regions, so the only pixels a correct pipeline may
get wrong are those of patches that straddle a border.

The network is a timm ``VisionTransformer`` of the family datus accepts (``vit_tiny_patch16_224``
with ``backbone_kwargs``), saved as a plain state dict and loaded by ``--model.weights FILE``
with the product's own strict loader. Its residual stream has :data:`WIDTH` channels:

====== =================================================================================
0-2    ``raw``: the patch's mean colour in [0, 1] (black is 0)
3-5    ``z = raw - 0.5``: the colour centred on the palette's centre
6-8    ``-raw``
9-11   ``-z``
12-15  always 0
====== =================================================================================

Every token (the CLS token included) therefore has channel mean 0, so timm's LayerNorms (weight
1, bias 0) only divide a token by its root mean square: they change lengths, never directions,
and a product's sign survives them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

BACKBONE = "vit_tiny_patch16_224"
"""timm architecture of the planted network: the tests' tiny backbone, resized by ``backbone_kwargs``."""

WIDTH, DEPTH, HEADS = 16, 1, 2
CENTRE = 0.5
"""Centre of the palette in [0, 1] colour space: ``z`` channels measure colours from it."""

SPREAD = 0.35
PALETTE = np.array([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]], dtype=np.float64)
"""Directions of the four colours from :data:`CENTRE`: the vertices of a regular tetrahedron, so
the centred colours of any two different classes have a cosine of -1/3 and of one class +1."""

COLOURS = np.round(255 * (CENTRE + SPREAD * PALETTE)).astype(np.uint8)
"""Class ``c`` is painted ``COLOURS[c]``: light grey, red, green, blue (217 or 38 per channel)."""

NUM_CLASSES = len(COLOURS)


def backbone_kwargs(patch_size: int) -> dict[str, int]:
    """``--model.backbone_kwargs`` of the planted network at ``patch_size``."""
    return {"depth": DEPTH, "embed_dim": WIDTH, "num_heads": HEADS, "patch_size": patch_size}


def planted_state_dict(patch_size: int) -> dict[str, torch.Tensor]:
    """The planted network's weights: every tensor set by hand, none trained.

    Why each weight is what it is:

    - ``patch_embed``: the input is normalised (``(x - mean) / std`` with the backbone's own mean
      and std, :func:`datus.discovery.backbones.normalization_of`), so each output channel that should read
      ``a * raw_c + b`` (the patch's mean of colour channel c in [0, 1]) has kernel
      ``a * std_c / p^2`` on input channel c and bias ``a * mean_c + b``: the normalisation is
      undone exactly, black patches give ``raw = 0``. ``a, b`` are ``(1, 0)`` for ``raw``,
      ``(1, -0.5)`` for ``z`` and their negatives for the mirrored channels.
    - ``cls_token``, ``pos_embed``: zero. No position information, so a patch's tokens depend on
      its colour alone (and the interpolated positional embedding of any input size is zero
      too); the CLS token's value is zero, so it adds nothing to the averages below.
    - blocks before the last (there are none at ``DEPTH`` 1, which keeps the 6,400-token passes
      of an 80 x 80 grid cheap; a deeper network still works): seeded random ``qkv`` and
      ``mlp.fc1``, zero ``attn.proj`` and ``mlp.fc2``, so each adds nothing to the stream and its
      keys are noise: were datus to read the keys of any block but the last, its graph would be
      random.
    - last block, queries: zero, so every token attends uniformly to all tokens it may see (the
      whole crop in ``crop`` mode, its own segment in ``packed`` mode).
    - last block, keys: ``z / rms(token)`` (head 0, dims 0-2). The graph's edge ``k_i . k_j > 0``
      then has the sign of ``z_i . z_j``: positive within a colour, ``-|z|^2 / 3`` across two
      colours, and for a patch that mixes colours a and b in proportion t : 1 - t, positive
      with a exactly when t > 1/4. Louvain finds one community per colour.
    - last block, values: ``raw / rms(token)``; ``attn.proj`` writes their average into the
      ``raw`` channels and its negative into the ``-raw`` channels (channel mean stays 0).
      Black pixels around a cropped segment have ``raw = 0`` and add nothing but a shorter
      vector, so after L2 normalisation a segment's CLS token is the direction of its colour,
      whatever its shape or the crop's black margin: the four colours are at cosines of 0.36 to
      0.76 from each other, each class a tight cluster for k-means.
    - last block, MLP: zero ``fc2`` (the identity again); final ``norm``: weight 1, bias 0.
    """
    from datus.discovery.backbones import build_backbone, normalization_of

    mean, std = normalization_of(BACKBONE)
    model = build_backbone(BACKBONE, "random", **backbone_kwargs(patch_size))
    state = {key: torch.zeros_like(value) for key, value in model.state_dict().items()}
    for key, value in state.items():
        if key.endswith(("norm1.weight", "norm2.weight")) or key == "norm.weight":
            state[key] = torch.ones_like(value)
    area = patch_size * patch_size
    kernel, bias = state["patch_embed.proj.weight"], state["patch_embed.proj.bias"]
    for first, scale, offset in ((0, 1.0, 0.0), (3, 1.0, -CENTRE), (6, -1.0, 0.0), (9, -1.0, CENTRE)):
        for channel in range(3):
            kernel[first + channel, channel] = scale * std[channel] / area
            bias[first + channel] = scale * mean[channel] + offset
    generator = torch.Generator().manual_seed(0)
    for block in range(DEPTH - 1):
        for name in ("attn.qkv.weight", "mlp.fc1.weight"):
            key = f"blocks.{block}.{name}"
            state[key] = torch.randn(state[key].shape, generator=generator)
    last = f"blocks.{DEPTH - 1}"
    qkv = state[f"{last}.attn.qkv.weight"]  # rows: queries 0..W-1 (zero), keys W..2W-1, values 2W..3W-1
    proj = state[f"{last}.attn.proj.weight"]
    for channel in range(3):
        qkv[WIDTH + channel, 3 + channel] = 1.0  # key = z
        qkv[2 * WIDTH + channel, channel] = 1.0  # value = raw
        proj[channel, channel] = 1.0  # raw channels += mean value
        proj[6 + channel, channel] = -1.0  # -raw channels -= mean value
    return state


def planted_embedding(class_id: int) -> np.ndarray:
    """The unit embedding a segment of pure colour ``class_id`` gets: its colour in the ``raw``
    channels, mirrored in ``-raw``, zero elsewhere (see :func:`planted_state_dict`)."""
    colour = COLOURS[class_id] / 255.0
    vector = np.zeros(WIDTH)
    vector[0:3], vector[6:9] = colour, -colour
    return vector / np.linalg.norm(vector)


def classes_of_centroids(centroids: np.ndarray) -> dict[int, int]:
    """Cluster -> the class whose :func:`planted_embedding` is nearest to the cluster's centroid.

    What the fit itself says each cluster is, read without any mask: a painting whose matched
    classes disagree has mixed up cluster ids between the fit and the painting.
    """
    embeddings = np.stack([planted_embedding(c) for c in range(NUM_CLASSES)])
    return {k: int(np.argmax(embeddings @ centroid)) for k, centroid in enumerate(centroids)}


def write_planted_weights(path: Path, patch_size: int) -> Path:
    """Save :func:`planted_state_dict` where ``--model.weights`` can read it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(planted_state_dict(patch_size), path)
    return path


def write_planted_config(path: Path, patch_size: int, weights: Path, grid: int = 16) -> Path:
    """A ``datus predict`` config for the planted network: a ``grid x grid`` patch grid, K = C = 4."""
    kwargs = "\n".join(f"    {key}: {value}" for key, value in backbone_kwargs(patch_size).items())
    path.write_text(
        f"""seed_everything: 0
trainer:
  accelerator: cpu
  devices: 1
  enable_progress_bar: false
model:
  backbone: {BACKBONE}
  weights: {weights}
  image_size: {grid * patch_size}
  min_patches: 5
  crop_batch_size: 64
  louvain_workers: 0
  backbone_kwargs:
{kwargs}
data:
  batch_size: 4
  num_workers: 0
cluster:
  num_clusters: {NUM_CLASSES}
  workers: 1
  gallery: false
eval:
  num_classes: {NUM_CLASSES}
"""
    )
    return path


# Scenes ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scene:
    """One planted image: its id, displayed size, and how its file stores it."""

    name: str
    height: int
    width: int
    seed: int
    classes: tuple[int, ...] = (0, 1, 2, 3)
    orientation: int = 1
    """EXIF orientation of the stored file (1: none; a JPEG otherwise), the displayed image is the scene."""


def scene_labels(scene: Scene) -> np.ndarray:
    """Ground truth of ``scene``: class ids (colour indices) of irregular regions, H x W uint8.

    Regions are the Voronoi cells of one jittered seed per class, in coordinates normalised to
    the image's sides (so every scene has the same regions in patch-grid terms whatever its
    aspect ratio: the model input is a square), with both axes warped by sinusoids: borders
    are curves that cross the patch grid at every phase, never along it.
    """
    rng = np.random.default_rng(scene.seed)
    count = len(scene.classes)
    angles = rng.uniform(0, 2 * np.pi) + 2 * np.pi * np.arange(count) / count
    seeds = 0.5 + 0.3 * np.stack([np.cos(angles), np.sin(angles)], 1) + rng.uniform(-0.06, 0.06, (count, 2))
    v = (np.arange(scene.height) + 0.5)[:, None] / scene.height
    u = (np.arange(scene.width) + 0.5)[None, :] / scene.width
    phase = rng.uniform(0, 2 * np.pi, 2)
    wavelength = rng.uniform(0.25, 0.4, 2)
    warped_u = u + WARP * np.sin(2 * np.pi * v / wavelength[0] + phase[0])
    warped_v = v + WARP * np.sin(2 * np.pi * u / wavelength[1] + phase[1])
    distances = [(warped_u - x) ** 2 + (warped_v - y) ** 2 for x, y in seeds]
    order = rng.permutation(count)
    return np.asarray(scene.classes, dtype=np.uint8)[order][np.argmin(np.stack(distances), 0)]


WARP = 0.06
"""Amplitude of the sinusoidal warp of region borders, in image sides."""

EXIF_ORIENTATION = 0x0112


def stored_pixels(displayed: np.ndarray, orientation: int) -> np.ndarray:
    """The pixels a camera stores for ``displayed`` under EXIF ``orientation`` (1, 3, 6 or 8)."""
    turns = {1: 0, 3: 2, 6: 1, 8: 3}[orientation]  # counter-clockwise quarter turns; the viewer undoes them
    return np.ascontiguousarray(np.rot90(displayed, turns))


def write_scene(scene: Scene, images: Path, masks: Path) -> None:
    """The scene's image (PNG, or a high-quality 4:4:4 JPEG with an EXIF orientation) and its mask PNG."""
    labels = scene_labels(scene)
    pixels = COLOURS[labels]
    (images / scene.name).parent.mkdir(parents=True, exist_ok=True)
    (masks / scene.name).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(labels).save(masks / f"{scene.name}.png")
    if scene.orientation == 1:
        Image.fromarray(pixels).save(images / f"{scene.name}.png")
        return
    path = images / f"{scene.name}.jpg"
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = scene.orientation
    stored = Image.fromarray(stored_pixels(pixels, scene.orientation))
    stored.save(path, quality=98, subsampling=0, exif=exif.tobytes())
    with Image.open(path) as written:  # the displayed image is the scene, its colours intact
        shown = np.asarray(ImageOps.exif_transpose(written).convert("RGB"), dtype=np.int16)
    assert shown.shape[:2] == labels.shape
    assert np.percentile(np.abs(shown - pixels).max(-1), 90) <= 8, f"{path}: JPEG changed the colours"


SCENES_A: tuple[Scene, ...] = (
    Scene("square", 64, 64, seed=1),
    Scene("wide", 96, 160, seed=2),
    Scene("tall", 200, 120, seed=3),
    Scene("three colours", 150, 150, seed=4, classes=(0, 2, 3)),
    Scene("strip", 72, 200, seed=5),
    Scene("nested/small", 80, 104, seed=6, classes=(1, 2, 3)),
    Scene("exif rotated 90", 90, 136, seed=7, orientation=6),
    Scene("exif rotated 180", 112, 96, seed=8, orientation=3),
)
"""The first set: varied sizes and aspect ratios, 3 or 4 colours, two EXIF-rotated JPEGs."""

SCENES_B: tuple[Scene, ...] = (
    Scene("panorama", 300, 4100, seed=11),
    Scene("b square", 120, 120, seed=12),
    Scene("b tall", 184, 88, seed=13, classes=(0, 1, 3)),
    Scene("b exif rotated 270", 104, 144, seed=14, orientation=8),
)
"""A second set, labelled with the first set's fit: one image above 4,000 px on a side."""


def write_scenes(root: Path, scenes: Sequence[Scene]) -> Path:
    """``root/images`` and ``root/masks`` (``--data.root``, ``--data.mask_dir``) for ``scenes``."""
    for scene in scenes:
        write_scene(scene, root / "images", root / "masks")
    return root


# Scoring, independently of datus --------------------------------------------------------------


def confusion(pairs: Sequence[tuple[np.ndarray, np.ndarray]], num_clusters: int, num_classes: int) -> np.ndarray:
    """Pooled (cluster x class) pixel counts of (prediction, ground truth) pairs, in numpy."""
    counts = np.zeros((num_clusters, num_classes), dtype=np.int64)
    for predicted, truth in pairs:
        assert predicted.shape == truth.shape, f"mask {predicted.shape} against ground truth {truth.shape}"
        scored = truth != 255
        np.add.at(counts, (predicted[scored].astype(np.int64), truth[scored].astype(np.int64)), 1)
    return counts


def best_matching(counts: np.ndarray) -> dict[int, int]:
    """Cluster -> class that maximises matched pixels, by trying every permutation (K = C <= 4)."""
    from itertools import permutations

    size = counts.shape[0]
    assert counts.shape == (size, size) and size <= 6
    best = max(permutations(range(size)), key=lambda classes: sum(counts[k, c] for k, c in enumerate(classes)))
    return dict(enumerate(best))


def interior(truth: np.ndarray, radius: tuple[int, int]) -> np.ndarray:
    """Pixels whose (2 ry + 1) x (2 rx + 1) neighbourhood holds one class only (borders eroded)."""
    from scipy.ndimage import maximum_filter, minimum_filter

    size = (2 * radius[0] + 1, 2 * radius[1] + 1)
    return (maximum_filter(truth, size=size, mode="nearest") == minimum_filter(truth, size=size, mode="nearest")) & (
        truth != 255
    )


def patch_radius(shape: tuple[int, int], grid: int) -> tuple[int, int]:
    """One patch of the ``grid x grid`` model input, in pixels of an image of ``shape`` (rows, columns)."""
    return math.ceil(shape[0] / grid), math.ceil(shape[1] / grid)
