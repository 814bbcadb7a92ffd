"""Label-free diagnostics: numbers that tell a broken run from a healthy one without ground truth.

Most collections have no masks, and a run can fail quietly: a threshold that turns most of an
image into noise, a backbone whose patch graph has no community structure, one cluster that
swallows everything, or a K that the embeddings do not support. These numbers catch those
cases from the shards and the fitted model alone (no ViT, no images decoded):

- segments per image, valid and noise, as histograms;
- the share of pixels in noise segments (pixel-weighted: each segment counts its share of the
  patch grid times its image's pixels);
- cluster sizes in valid segments and in pixels of the dense masks (noise segments counted in
  their donor's cluster, as painted; masks refined by a CRF are not re-read);
- the mean modularity of the Louvain partitions (recorded per image at prediction);
- stability: the adjusted Rand index, over a seeded sample of valid segments (each counts once),
  between the run's clusters and a second k-means with the next seed fitted on that sample.

Every count is a sum over shards (:class:`Counts`, filled by the painting workers and merged),
so the diagnostics cost no pass of their own and no memory beyond a few numbers per image.
The stability sample is the fit's initialisation sample rule (:func:`sampled_stability`): the
valid segments with the smallest seeded keys, at most ``max(10000, 50 K)``, so its cost is
bounded whatever the size of the run, and it is measured once per fit and kept beside it.

They go to ``summary.json`` (``diagnostics``) and, drawn by :func:`diagnostics_panel`, to the
bottom of ``report.png``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from datus.stages.clustering import ClusterModel, Rows, fit_clusters
from datus.stages.clustering.streamed import draw_sample, sample_size
from datus.core.collective import Collective
from datus.outputs.drawing import BACKGROUND, INK, PAD, fit_text, font_of, text_width
from datus.stages.labels import segment_labels
from datus.stages.metrics import agreement_scores
from datus.runfolder.records import ImageRecord
from datus.core.settings import ClusterSettings

log = logging.getLogger(__name__)

HISTOGRAM_BINS = 20
"""Most bars of a segments-per-image histogram; counts up to this many get one bar per value."""

PANEL_WIDTH = 640
"""Width of the report's diagnostics panel: beside a confusion matrix it stays at scale 1."""
CHART_HEIGHT = 110
"""Height of the bars area of each chart in the panel."""
_LINE = 17
_BAR_GREY = (150, 150, 150)


@dataclass(frozen=True)
class ClusterSizes:
    """How big each cluster is, in valid segments and in pixels of the dense (unrefined) masks.

    Attributes:
        segments: K valid-segment counts.
        pixels: K pixel counts, estimated from patch counts (a segment holds its share of the
            patch grid of its image's pixels), so that they sum to the run's pixels exactly.
    """

    segments: np.ndarray
    pixels: np.ndarray

    @property
    def segment_share(self) -> np.ndarray:
        return self.segments / max(int(self.segments.sum()), 1)

    @property
    def pixel_share(self) -> np.ndarray:
        return self.pixels / max(float(self.pixels.sum()), 1.0)


@dataclass(frozen=True)
class Diagnostics:
    """The label-free diagnostics of one clustering of a run.

    Attributes:
        valid_per_image: valid segments of every image, in image-id order.
        noise_per_image: noise segments of every image, same order.
        noise_pixels: pixels in noise segments, all images together.
        total_pixels: pixels of all images.
        clusters: cluster sizes.
        modularity: every image's Louvain modularity (NaN where the shards did not record it).
        stability: ARI against the second k-means, or None when it could not be fitted.
        stability_seed: the second k-means' seed.
    """

    valid_per_image: np.ndarray
    noise_per_image: np.ndarray
    noise_pixels: float
    total_pixels: float
    clusters: ClusterSizes
    modularity: np.ndarray
    stability: float | None
    stability_seed: int

    @property
    def num_images(self) -> int:
        return int(len(self.valid_per_image))

    @property
    def noise_pixel_fraction(self) -> float:
        return self.noise_pixels / self.total_pixels if self.total_pixels else 0.0

    @property
    def images_without_valid_segments(self) -> int:
        return int((self.valid_per_image == 0).sum())

    def modularity_summary(self) -> dict[str, Any]:
        measured = self.modularity[np.isfinite(self.modularity)]
        if not len(measured):
            return {"mean": None, "min": None, "max": None, "images": 0}
        return {
            "mean": float(measured.mean()),
            "min": float(measured.min()),
            "max": float(measured.max()),
            "images": int(len(measured)),
        }

    def summary(self) -> dict[str, Any]:
        """The ``diagnostics`` object of ``summary.json`` (README: how to read it)."""
        sizes = self.clusters
        return {
            "segments_per_image": {
                "valid": count_summary(self.valid_per_image),
                "noise": count_summary(self.noise_per_image),
            },
            "images_without_valid_segments": self.images_without_valid_segments,
            "noise_pixel_fraction": self.noise_pixel_fraction,
            "clusters": {
                "segments": sizes.segments.tolist(),
                "pixels": np.rint(sizes.pixels).astype(np.int64).tolist(),
                "segment_share": sizes.segment_share.tolist(),
                "pixel_share": sizes.pixel_share.tolist(),
                "largest_pixel_share": float(sizes.pixel_share.max()),
                "empty": [int(k) for k in np.flatnonzero(sizes.segments == 0)],
            },
            "modularity": self.modularity_summary(),
            "stability": {
                "ari": self.stability,
                "over": "a seeded sample of valid segments",
                "against": f"k-means with seed {self.stability_seed}",
            },
        }


NOISE_LIMIT = 0.25
"""Most pixels of a healthy run lie in valid segments; above this share the patch graph fell apart."""
NO_SEGMENT_LIMIT = 0.2
"""Share of images without a valid segment (they get one label from their CLS token) above which the run is suspicious."""
MODULARITY_FLOOR = 0.1
"""Mean Louvain modularity below which the patch graphs have no community structure."""
LARGEST_CLUSTER_LIMIT = 0.8
"""Pixel share of one cluster above which the features do not separate the scene."""
STABILITY_FLOOR = 0.7
"""Stability ARI below which a second k-means disagrees: K is too high for the data, or the groups unclear."""


def verdict(summary: dict[str, Any], images: int, random_weights: bool) -> dict[str, Any]:
    """``healthy`` or ``suspicious``, with the reasons, from the label-free diagnostics alone.

    Each rule is one threshold above (the README lists them); ``random_weights`` is always a
    reason, since such masks look plausible and mean nothing.
    """
    reasons = []
    if random_weights:
        reasons.append("random weights (--model.weights random): the masks mean nothing")
    if summary["noise_pixel_fraction"] > NOISE_LIMIT:
        reasons.append(f"{100 * summary['noise_pixel_fraction']:.0f}% of pixels in noise segments (healthy: a few percent)")
    if summary["images_without_valid_segments"] > NO_SEGMENT_LIMIT * images:
        reasons.append(f"{summary['images_without_valid_segments']} of {images} images without a valid segment")
    modularity = summary["modularity"]["mean"]
    if modularity is not None and modularity < MODULARITY_FLOOR:
        reasons.append(f"mean modularity {modularity:.2f}: the patch graphs have no community structure")
    if summary["clusters"]["largest_pixel_share"] > LARGEST_CLUSTER_LIMIT and len(summary["clusters"]["pixels"]) > 1:
        reasons.append(f"one cluster holds {100 * summary['clusters']['largest_pixel_share']:.0f}% of pixels")
    if summary["clusters"]["empty"]:
        reasons.append(f"{len(summary['clusters']['empty'])} clusters without a valid segment")
    ari = summary["stability"]["ari"]
    if ari is not None and ari < STABILITY_FLOOR:
        reasons.append(f"stability ARI {ari:.2f}: a second k-means disagrees (try a lower K: datus cluster)")
    return {"status": "suspicious" if reasons else "healthy", "reasons": reasons}


def verdict_line(verdict: dict[str, Any]) -> str:
    if verdict["status"] == "healthy":
        return "verdict: healthy (the label-free diagnostics are in their usual ranges)"
    return "verdict: suspicious: " + "; ".join(verdict["reasons"])


def console_line(summary: dict[str, Any]) -> str:
    """One line of the end-of-run console text from the ``diagnostics`` object of ``summary.json``."""
    modularity, ari = summary["modularity"]["mean"], summary["stability"]["ari"]
    return (
        f"diagnostics: {100 * summary['noise_pixel_fraction']:.1f}% of pixels in noise segments, "
        f"largest cluster {100 * summary['clusters']['largest_pixel_share']:.1f}% of pixels, "
        f"mean modularity {'n/a' if modularity is None else f'{modularity:.3f}'}, "
        f"stability ARI {'n/a' if ari is None else f'{ari:.3f}'}"
    )


def count_summary(counts: np.ndarray) -> dict[str, Any]:
    """Mean, median, range and an integer-binned histogram of per-image counts."""
    counts = np.asarray(counts, dtype=np.int64)
    edges, histogram = count_histogram(counts)
    return {
        "mean": float(counts.mean()) if len(counts) else None,
        "median": float(np.median(counts)) if len(counts) else None,
        "min": int(counts.min()) if len(counts) else None,
        "max": int(counts.max()) if len(counts) else None,
        "histogram": {"bin_edges": edges.tolist(), "counts": histogram.tolist()},
    }


def count_histogram(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(edges, counts) of integer bins ``[edge_i, edge_i+1)`` from 0 past the largest count.

    One bin per value up to :data:`HISTOGRAM_BINS` values, wider equal integer bins beyond.
    """
    largest = int(counts.max()) if len(counts) else 0
    width = -(-(largest + 1) // HISTOGRAM_BINS)
    edges = np.arange(0, largest + width + 1, width)
    return edges, np.histogram(counts, bins=edges)[0]


@dataclass(frozen=True)
class Stability:
    """ARI against a second k-means (None when it could not be measured), its seed and its sample size."""

    ari: float | None
    seed: int
    segments: int

    def to_json(self) -> dict[str, Any]:
        return {"ari": self.ari, "seed": self.seed, "segments": self.segments}

    @classmethod
    def from_json(cls, content: Any) -> Stability | None:
        """Read back :meth:`to_json` from an untrusted file: None unless every field is sound."""
        if not isinstance(content, dict):
            return None
        ari, seed, segments = content.get("ari"), content.get("seed"), content.get("segments")
        sound_ari = ari is None or (isinstance(ari, float) and -1.0 <= ari <= 1.0)
        if not (sound_ari and isinstance(seed, int) and isinstance(segments, int) and segments >= 0):
            return None
        return cls(ari, seed, segments)


class Counts:
    """The per-image and per-cluster sums behind :class:`Diagnostics`, mergeable across shards and workers."""

    def __init__(self, num_clusters: int) -> None:
        self.valid: list[np.ndarray] = []
        self.noise: list[np.ndarray] = []
        self.modularity: list[np.ndarray] = []
        self.segments = np.zeros(num_clusters, dtype=np.int64)
        self.pixels = np.zeros(num_clusters, dtype=np.float64)
        self.noise_pixels = 0.0
        self.total_pixels = 0.0

    def add(self, records: Sequence[ImageRecord], labels: Sequence[np.ndarray]) -> None:
        """One shard's records and their segment labels (:func:`datus.stages.fit.segment_labels`)."""
        num_clusters = len(self.segments)
        valid_counts, noise_counts, modularity = [], [], []
        for record, record_labels in zip(records, labels):
            image_pixels = float(record.orig_size[0] * record.orig_size[1])
            segment_pixels = record.sizes.astype(np.float64) * image_pixels / record.segment_map.size
            valid = ~record.is_noise
            self.noise_pixels += float(segment_pixels[record.is_noise].sum())
            self.total_pixels += image_pixels
            self.pixels += np.bincount(record_labels, weights=segment_pixels, minlength=num_clusters)
            self.segments += np.bincount(record_labels[valid], minlength=num_clusters)
            valid_counts.append(int(valid.sum()))
            noise_counts.append(int(record.is_noise.sum()))
            modularity.append(record.modularity)
        self.valid.append(np.array(valid_counts, dtype=np.int32))
        self.noise.append(np.array(noise_counts, dtype=np.int32))
        self.modularity.append(np.array(modularity, dtype=np.float64))

    def merge(self, other: Counts) -> None:
        """Add another accumulator's sums (merge in shard order: float sums then never depend on workers)."""
        self.valid += other.valid
        self.noise += other.noise
        self.modularity += other.modularity
        self.segments += other.segments
        self.pixels += other.pixels
        self.noise_pixels += other.noise_pixels
        self.total_pixels += other.total_pixels

    def diagnostics(self, stability: Stability | None) -> Diagnostics:
        def joined(parts: list[np.ndarray], dtype: Any) -> np.ndarray:
            return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)

        return Diagnostics(
            valid_per_image=joined(self.valid, np.int32).astype(np.int64),
            noise_per_image=joined(self.noise, np.int32).astype(np.int64),
            noise_pixels=self.noise_pixels,
            total_pixels=self.total_pixels,
            clusters=ClusterSizes(self.segments, self.pixels),
            modularity=joined(self.modularity, np.float64),
            stability=None if stability is None else stability.ari,
            stability_seed=-1 if stability is None else stability.seed,
        )


def measure(batches: Iterable[Sequence[ImageRecord]], model: ClusterModel, stability: Stability | None) -> Diagnostics:
    """Every diagnostic of the clustering ``model`` on the records of ``batches`` (one list per shard).

    Labels come as painting gives them (:func:`datus.stages.fit.segment_labels`).
    """
    counts = Counts(model.num_clusters)
    for records in batches:
        counts.add(records, segment_labels(model, list(records)))
    return counts.diagnostics(stability)


def sampled_stability(rows: Rows, model: ClusterModel, settings: ClusterSettings, group: Collective) -> Stability:
    """:func:`stability` on the seeded sample of ``rows`` (every rank of ``group`` takes part).

    The sample is the fit's rule (:func:`datus.stages.clustering.streamed.sample_size`): up to
    ``max(10000, 50 K)`` valid segments, drawn by smallest seeded key with the second fit's seed.
    """
    second = second_settings(settings)
    total = group.sum_counts([len(rows)])[0]
    if total < 2:
        return Stability(None, second.seed, total)
    sample = draw_sample(rows, sample_size(total, model.num_clusters), second.seed, group).cpu().numpy()
    return Stability(stability(sample, model.assign(sample), second), second.seed, len(sample))


def second_settings(settings: ClusterSettings) -> ClusterSettings:
    """The run's clustering with the next seed, in scikit-learn in this process.

    scikit-learn, whatever the run's engine: diagnostics run on rank 0 alone, where the torch
    engine would wait for the other ranks.
    """
    return dataclasses.replace(settings, seed=(settings.seed + 1) % 2**32, engine="sklearn", centroids=None)


def stability(embeddings: np.ndarray, labels: np.ndarray, second: ClusterSettings) -> float | None:
    """ARI, over the valid segments, between ``labels`` and a k-means fitted with ``second``.

    1 means a fresh k-means finds the same clusters; well below 1 means the clusters depend on
    the seed (K too high, or embeddings without clear groups). None when there are fewer than
    two segments or the second fit is impossible (e.g. applied centroids with K above the
    segments).
    """
    if len(embeddings) < 2:
        return None
    data = np.asarray(embeddings, dtype=np.float32)
    try:
        other = fit_clusters(data, second).assign(data)
    except ValueError as error:
        log.warning("diagnostics: no stability score, the second k-means failed: %s", error)
        return None
    k = max(int(labels.max()), int(other.max())) + 1
    contingency = np.bincount(labels * k + other, minlength=k * k).reshape(k, k)
    return agreement_scores(contingency)["ari"]


def diagnostics_panel(diagnostics: Diagnostics, colours: np.ndarray, gallery: bool, judged: dict[str, Any]) -> Image.Image:
    """The report's panel: the verdict, key numbers, segments-per-image histograms and cluster sizes.

    Args:
        diagnostics: what :func:`measure` found.
        colours: K x 3 cluster colours, as in the colour masks (so bars match the masks).
        gallery: whether cluster galleries were written (a line then says where).
        judged: :func:`verdict` of these diagnostics.
    """
    title_font, font, small = font_of(15), font_of(12), font_of(10)
    modularity = diagnostics.modularity_summary()
    lines = [
        f"verdict: {judged['status']}" + (" (numbers in their usual ranges)" if not judged["reasons"] else ":"),
        *(f"  - {reason}" for reason in judged["reasons"]),
        f"noise: {100 * diagnostics.noise_pixel_fraction:.1f}% of pixels in noise segments; "
        f"{diagnostics.images_without_valid_segments} of {diagnostics.num_images} images without a valid segment",
        "Louvain modularity: "
        + (
            f"mean {modularity['mean']:.3f} (min {modularity['min']:.3f}, max {modularity['max']:.3f})"
            if modularity["mean"] is not None
            else "not recorded in these shards"
        ),
        "stability: "
        + (
            f"ARI {diagnostics.stability:.3f} against k-means with seed {diagnostics.stability_seed} (a seeded sample of valid segments)"
            if diagnostics.stability is not None
            else "not measured"
        ),
        f"largest cluster: {100 * float(diagnostics.clusters.pixel_share.max()):.1f}% of pixels",
    ]
    if gallery:
        lines.append("cluster galleries: gallery/index.png and gallery/cluster_<k>.png beside this report")
    half = (PANEL_WIDTH - 3 * PAD) // 2
    valid_chart = _histogram_chart(diagnostics.valid_per_image, "valid segments per image", half, small)
    noise_chart = _histogram_chart(diagnostics.noise_per_image, "noise segments per image", half, small)
    sizes_chart = _sizes_chart(diagnostics.clusters, colours, PANEL_WIDTH - 2 * PAD, small)
    height = PAD + 22 + _LINE * len(lines) + PAD + valid_chart.height + PAD + sizes_chart.height + PAD
    panel = Image.new("RGB", (PANEL_WIDTH, height), BACKGROUND)
    draw = ImageDraw.Draw(panel)
    draw.rectangle([0, 0, PANEL_WIDTH - 1, height - 1], outline=(200, 200, 200))
    draw.text((PAD, PAD), "label-free diagnostics (README: how to read them)", fill=INK, font=title_font)
    y = PAD + 22
    for line in lines:
        draw.text((PAD, y), fit_text(line, font, PANEL_WIDTH - 2 * PAD), fill=INK, font=font)
        y += _LINE
    y += PAD
    panel.paste(valid_chart, (PAD, y))
    panel.paste(noise_chart, (2 * PAD + half, y))
    y += valid_chart.height + PAD
    panel.paste(sizes_chart, (PAD, y))
    return panel


def _histogram_chart(counts: np.ndarray, title: str, width: int, font: Any) -> Image.Image:
    """Bars of :func:`count_histogram` with the first and last edges and the tallest bar's count."""
    edges, histogram = count_histogram(np.asarray(counts, dtype=np.int64))
    chart = Image.new("RGB", (width, CHART_HEIGHT + 3 * 14), BACKGROUND)
    draw = ImageDraw.Draw(chart)
    draw.text((0, 0), title, fill=INK, font=font)
    top, bottom = 14, 14 + CHART_HEIGHT
    tallest = max(int(histogram.max()), 1)
    bar = (width - 2) / len(histogram)
    for index, count in enumerate(histogram.tolist()):
        if count:
            x0 = 1 + round(index * bar)
            x1 = max(x0, 1 + round((index + 1) * bar) - 2)
            draw.rectangle([x0, bottom - round(count / tallest * (CHART_HEIGHT - 4)), x1, bottom], fill=_BAR_GREY)
    draw.line([0, bottom, width - 1, bottom], fill=INK)
    draw.text((width - text_width(f"{tallest} images", font) - 2, top), f"{tallest} images", fill=INK, font=font)
    step = int(edges[1] - edges[0])
    first, last = (f"{int(low)}" if step == 1 else f"{int(low)}-{int(low) + step - 1}" for low in (edges[0], edges[-2]))
    draw.text((1, bottom + 2), first, fill=INK, font=font)
    draw.text((width - text_width(last, font) - 2, bottom + 2), last, fill=INK, font=font)
    note = "one bar per count" if step == 1 else f"bars of {step} counts"
    draw.text(((width - text_width(note, font)) // 2, bottom + 2), note, fill=(90, 90, 90), font=font)
    return chart


def _sizes_chart(sizes: ClusterSizes, colours: np.ndarray, width: int, font: Any) -> Image.Image:
    """Per cluster, its share of pixels (its mask colour) beside its share of valid segments (grey)."""
    num_clusters = len(sizes.segments)
    title = "cluster sizes: share of pixels (mask colour) and of valid segments (grey)"
    chart = Image.new("RGB", (width, CHART_HEIGHT + 3 * 14), BACKGROUND)
    draw = ImageDraw.Draw(chart)
    draw.text((0, 0), title, fill=INK, font=font)
    bottom = 14 + CHART_HEIGHT
    tallest = max(float(sizes.pixel_share.max()), float(sizes.segment_share.max()), 1e-12)
    slot = (width - 2) / num_clusters
    gap = 0 if slot < 8 else max(2, round(0.2 * slot))
    for k in range(num_clusters):
        x0, x1 = 1 + round(k * slot), 1 + round((k + 1) * slot) - gap
        middle = (x0 + x1) // 2
        for share, colour, left, right in (
            (sizes.pixel_share[k], tuple(int(c) for c in colours[k]), x0, middle),
            (sizes.segment_share[k], _BAR_GREY, middle, x1),
        ):
            height = round(float(share) / tallest * (CHART_HEIGHT - 4))
            if height:
                draw.rectangle([left, bottom - height, max(left, right - 1), bottom], fill=colour, outline=(90, 90, 90))
        label_every = max(1, -(-(text_width(str(num_clusters), font) + 4) // max(int(slot), 1)))
        if k % label_every == 0:
            draw.text((middle - text_width(str(k), font) // 2, bottom + 2), str(k), fill=INK, font=font)
    draw.line([0, bottom, width - 1, bottom], fill=INK)
    peak = f"top: {100 * tallest:.1f}%"
    draw.text((width - text_width(peak, font) - 2, 14), peak, fill=INK, font=font)
    return chart
