"""What a finished run says about itself: dataset files, summary, skipped files, console lines.

A results folder is a segmentation dataset: ``manifest.jsonl`` pairs every input image with its
mask and ``classes.json`` names the K pseudo classes. ``summary.json`` and the console summary
report only what this invocation did, next to what earlier ones did.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datus.stages.diagnostics import STABILITY_FLOOR, console_line, verdict, verdict_line
from datus.core.errors import ConfigurationError, one_line
from datus.core.io import UnreadableFile, read_json, write_json, write_lines, write_text
from datus.stages.metrics import format_table
from datus.runfolder.run import (
    CLASSES_FILE, DATASET_FILE, HTML_INDEX, MANIFEST_FILE, REPORT_FILE, SKIPPED_FILE, SUMMARY_FILE, SWEEP_TABLE, Results,
    Run,
)  # fmt: skip
from datus.outputs.manifest import dataset_description, manifest_line
from datus.core.settings import RANDOM_WEIGHTS
from datus.runfolder.shards import read_image_paths


@dataclass
class PredictionLog:
    """What the prediction loop of this invocation did, summed over ranks (``logs/predict-rank*.json``)."""

    images_written: int = 0
    images_resumed: int = 0
    backbone_passes: int = 0
    skipped: list[dict[str, str]] = field(default_factory=list)
    stage_seconds: dict[str, float] = field(default_factory=dict)

    @classmethod
    def read(cls, run: Run) -> PredictionLog:
        merged = cls()
        for path in run.log_files():
            try:
                entry = read_json(path)
                merged.images_written += int(entry["images_written"])
                merged.images_resumed = max(merged.images_resumed, int(entry["images_resumed"]))
                merged.backbone_passes += int(entry["backbone_passes"])
                merged.skipped.extend({"path": str(s["path"]), "reason": str(s["reason"])} for s in entry["skipped"])
                for stage, value in entry["stage_seconds"].items():
                    merged.stage_seconds[stage] = merged.stage_seconds.get(stage, 0.0) + float(value)
            except (UnreadableFile, KeyError, TypeError, ValueError):
                continue  # a damaged log only loses timing information
        return merged


def write_dataset_files(
    run: Run, results: Results, num_clusters: int, mapping: dict[str, int | None] | None, class_names: Sequence[str] | None
) -> None:
    """Make the results folder a dataset: ``classes.json`` and a manifest of (image, mask) pairs.

    The manifest has one JSON object per line, in the order of the shards (streamed: memory does
    not grow with the run): ``image`` (path relative to the input root, which ``dataset.json``
    records once), ``mask`` (path relative to the results folder) and ``image_id``
    (:mod:`datus.outputs.manifest`). Masks are
    dense, so the ignore value never occurs in them; it is declared outside the cluster ids
    (255 for uint8 masks, 65535 for uint16) for training code that pads or augments.
    """
    names = []
    for cluster in range(num_clusters):
        matched = mapping.get(str(cluster)) if mapping else None
        names.append(class_names[matched] if matched is not None and class_names else f"cluster {cluster}")
    write_json(
        results.file(CLASSES_FILE),
        {
            "num_clusters": num_clusters,
            "classes": names,
            "class_ids": list(range(num_clusters)),
            "matched_class": [mapping.get(str(c)) if mapping else None for c in range(num_clusters)],
            "ignore_index": 255 if num_clusters <= 255 else 65535,
        },
    )
    image_root = _image_root(run)
    write_json(results.file(DATASET_FILE), dataset_description(image_root))
    write_lines(results.file(MANIFEST_FILE), _manifest_lines(run.shards(), image_root))


def _image_root(run: Run) -> Path | None:
    """The input folder the run read (``run.json``), which manifest image paths are relative to."""
    try:
        data = (run.recorded_identity() or {}).get("data") or {}
    except ConfigurationError:  # a damaged run.json was refused earlier; here it only costs relative paths
        return None
    root = data.get("images") if isinstance(data, dict) else None
    return Path(root) if isinstance(root, str) and Path(root).is_absolute() else None


def _manifest_lines(shards: Sequence[Path], image_root: Path | None) -> Iterator[str]:
    """One JSON line per recorded image, shard by shard (the shards' small id and path arrays only)."""
    for shard in shards:
        for image_id, path in read_image_paths([shard]):
            yield manifest_line(image_id, path, image_root)


def run_verdict(run: Run, diagnostics: dict[str, Any], images: int) -> dict[str, Any]:
    """:func:`datus.stages.diagnostics.verdict` for ``run``, whose ``run.json`` says whether its weights were random."""
    model = (run.recorded_identity() or {}).get("model", {})
    random_weights = RANDOM_WEIGHTS in (model.get("weights"), model.get("embedder_weights") if model.get("embedder") else None)
    return verdict(diagnostics, images, random_weights)


def write_summary(
    run: Run, results: Results, facts: dict[str, Any], skipped: list[dict[str, str]]
) -> dict[str, Any]:
    """``summary.json`` of the results folder and the run's ``skipped.json`` (always written)."""
    write_json(run.file(SKIPPED_FILE), skipped)
    summary = {**facts, "skipped": skipped, "results_dir": str(results.root)}
    write_json(results.file(SUMMARY_FILE), summary)
    return summary


def format_summary(summary: dict[str, Any], metrics: dict[str, Any] | None, class_names: list[str] | None) -> str:
    """The end-of-run console text: what was done now, what earlier, where the outputs are."""
    predicted = summary.get("images_predicted_now")
    done = f"{summary['images_in_run']} images"
    if predicted is not None:
        done += f" ({predicted} predicted now, {summary['images_from_earlier_runs']} from an earlier run)"
    lines = [
        f"datus: {done}, {len(summary['skipped'])} skipped",
        f"segments: {summary['segments']} valid + {summary['noise_segments']} noise, K = {summary['num_clusters']}",
    ]
    if "diagnostics" in summary:
        lines.append(console_line(summary["diagnostics"]))
    if "verdict" in summary:
        lines.append(verdict_line(summary["verdict"]))
    for skip in summary["skipped"][:10]:
        lines.append(f"  skipped {one_line(skip['path'])}: {one_line(skip['reason'])}")
    if len(summary["skipped"]) > 10:
        lines.append(f"  ... {len(summary['skipped']) - 10} more in skipped.json")
    if metrics:
        lines.append(format_table(metrics, class_names).rstrip())
    else:
        lines.append("not scored: no ground-truth masks (--data.mask_dir, or a dataset's true_masks)")
    results = Path(summary["results_dir"])
    lines.append(
        f"outputs: {results}; open {results / HTML_INDEX} in a browser (or {results / REPORT_FILE}); "
        f"seconds per stage in {results / SUMMARY_FILE}"
    )
    return "\n".join(lines)


SWEEP_COLUMNS = (
    "dense_miou", "dense_pixel_accuracy", "dense_nmi", "dense_ari", "paper_miou", "paper_pixel_accuracy", "stego_miou",
    "stego_pixel_accuracy",
)  # fmt: skip
LABEL_FREE_COLUMNS = ("stability_ari", "largest_pixel_share")
"""What a sweep without ground truth shows for each K (from the diagnostics)."""


def sweep_row(num_clusters: int, summary: dict[str, Any], metrics: dict[str, Any] | None) -> dict[str, Any]:
    row: dict[str, Any] = {"k": num_clusters, "segments": summary["segments"], "results_dir": summary["results_dir"]}
    diagnostics = summary.get("diagnostics")
    if diagnostics:
        row |= {
            "stability_ari": diagnostics["stability"]["ari"],
            "largest_pixel_share": diagnostics["clusters"]["largest_pixel_share"],
            "empty_clusters": len(diagnostics["clusters"]["empty"]),
        }
    for name, protocol in (metrics or {}).get("protocols", {}).items():
        for key in ("miou", "pixel_accuracy", "nmi", "ari"):
            row[f"{name}_{key}"] = protocol.get(key)
    for name, protocol in (metrics or {}).get("without_crf", {}).items():
        row[f"{name}_miou_without_crf"] = protocol.get("miou")
    return row


AGREED_RULE = (
    f"the largest K with stability ARI >= {STABILITY_FLOOR} and no empty cluster (stability alone favours the "
    "smallest K, which merges real groups)"
)
SUGGESTION_RULE = f"{AGREED_RULE}; when none qualifies, the most stable K"


def _agreed(row: dict[str, Any]) -> bool:
    """A K that a second k-means agrees on, with every cluster used."""
    return row.get("stability_ari") is not None and row["stability_ari"] >= STABILITY_FLOOR and not row.get("empty_clusters")


def suggested_k(rows: Sequence[dict[str, Any]]) -> int | None:
    """The K of a sweep that :data:`SUGGESTION_RULE` picks, without labels; None without measured stability."""
    measured = [row for row in rows if row.get("stability_ari") is not None]
    if not measured:
        return None
    agreed = [row for row in measured if _agreed(row)]
    if agreed:
        return int(max(row["k"] for row in agreed))
    return int(max(measured, key=lambda row: (row["stability_ari"], -row["k"]))["k"])


def format_sweep(rows: Sequence[dict[str, Any]]) -> str:
    """One line per K: stability ARI (0-1), the largest cluster and the scores as percentages; then the suggested K."""
    scored = [c for c in (*SWEEP_COLUMNS, "dense_miou_without_crf") if any(row.get(c) is not None for row in rows)]
    columns = [*LABEL_FREE_COLUMNS, *scored]
    lines = ["    K " + "".join(f"{c:>24}" for c in columns)]
    for row in rows:
        cells = "".join(
            f"{'-':>24}" if row.get(c) is None else f"{row[c]:>24.3f}" if c == "stability_ari" else f"{100 * row[c]:>23.2f}%"
            for c in columns
        )
        lines.append(f"{row['k']:>5} {cells}")
    suggestion = suggested_k(rows)
    if suggestion is not None and any(_agreed(row) for row in rows):
        lines.append(f"suggested K (label-free): {suggestion}, {AGREED_RULE}; look at its galleries before you keep it")
    elif suggestion is not None:
        lines.append(
            f"no K reaches stability ARI {STABILITY_FLOOR} with every cluster used; K = {suggestion} is only the most stable: "
            "try smaller K, and look at the galleries"
        )
    return "\n".join(lines)


def write_sweep(run: Run, rows: Sequence[dict[str, Any]]) -> str:
    """``clusters/summary.json`` (the rows and the suggested K) and ``clusters/summary.txt``; returns the table."""
    write_json(run.sweep_file(SUMMARY_FILE), {"rows": list(rows), "suggested_k": suggested_k(rows), "rule": SUGGESTION_RULE})
    table = format_sweep(rows)
    write_text(run.sweep_file(SWEEP_TABLE), table + "\n")
    return table
