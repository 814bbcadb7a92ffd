"""Benchmark the whole pipeline: images/s, seconds per stage, peak memory, and a yardstick.

The yardstick is the backbone alone doing the same number of forward passes at the same
precision and batch sizes (image passes in batches of ``--batch_size``; crops in the mean number
a predict batch embeds, at most ``--crop_batch_size``; packed rows one per image), after a
warm-up pass: end-to-end throughput close to it means the non-ViT work is hidden. The pipeline
is warmed up alike: a first, untimed run on ``--warm_up_images`` images pays what a process
pays once (numba's kernel cache, scikit-learn's import, first allocations); ``--warm_up_images 0``
times a cold run. Whole-process figures, imports included, are scripts/compare_reference.py's.

Pipeline and yardstick run ``--rounds`` times, alternately, each yardstick right after its
pipeline run: on a shared or throttling machine their speeds drift by tens of percent within a
minute, so the reported share is the median of the rounds' shares (each round's is listed too),
and seconds per stage are those of the median round.

    python scripts/benchmark.py                                   # SUIM sample, ViT-S/16, crops
    python scripts/benchmark.py --backbone vit_small_patch8_224.dino --embedding packed
    python scripts/benchmark.py --repeat 10 --embedding packed    # 420 images: memory stays flat?

Without internet the default weights are random (announced); segment counts, and therefore
timings of the embedding stage, depend on the weights: pass --weights FILE for real numbers.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from datus.callbacks.pipeline import ClusterPaintEvaluate
from datus.callbacks.writer import SegmentShardWriter
from datus.datamodules.images import ImageFolderDataModule
from datus.commands.cli import keep_freed_memory
from datus.discovery.module import DatusModule
from datus.commands.prepare import prepare_suim
from datus.runfolder.run import CLASSES_FILE
from datus.core.settings import ClusterSettings
from datus.core.workers import available_cores

SUIM_SAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "suim-sample"


class DataWaitTimer(Callback):
    """Seconds the loop waited for the data loader (decoding and resizing not hidden by workers)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._since: float | None = None

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._since = time.perf_counter()

    def on_predict_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self._since is not None:
            self.seconds += time.perf_counter() - self._since

    def on_predict_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self._since = time.perf_counter()


def repeated_dataset(source: Path, repeat: int, destination: Path, max_images: int | None = None) -> Path:
    """A DatUS-layout dataset: the first ``max_images`` of the source, ``repeat`` times (symlinks)."""
    stems = sorted(path.stem for path in (source / "train" / "images").iterdir())[:max_images]
    for copy in range(repeat):
        for kind in ("images", "true_masks"):
            if not (source / "train" / kind).is_dir():
                continue
            folder = destination / "train" / kind / f"copy{copy:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            for path in sorted((source / "train" / kind).iterdir()):
                if path.stem in stems:
                    (folder / path.name).symlink_to(path.resolve())
    classes = source / CLASSES_FILE
    if classes.is_file():
        (destination / CLASSES_FILE).write_text(classes.read_text())
    return destination


def backbone_alone_seconds(module: DatusModule, passes: int, batch_size: int, precision: str) -> float:
    """Time ``passes`` forward passes of the bare backbone on random inputs of the run's size."""
    device = module.device
    size = module.image_size
    inputs = torch.randn(batch_size, 3, size, size, device=device)
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
    with torch.inference_mode(), torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        module.backbone.forward_features(inputs)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        for start in range(0, passes, batch_size):
            module.backbone.forward_features(inputs[: min(batch_size, passes - start)])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return time.perf_counter() - started


def peak_host_megabytes() -> dict[str, float]:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"main_process_mb": round(own, 1), "largest_child_process_mb": round(children, 1)}


def predict(
    options: argparse.Namespace, data_root: Path, output_dir: Path, num_clusters: int
) -> tuple[float, DatusModule, dict[str, Any], float]:
    """One ``trainer.predict`` with a freshly built module: seconds, the module, the summary, data wait."""
    L.seed_everything(options.seed)  # random weights must be the same network in every run compared
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = DatusModule(
            backbone=options.backbone,
            weights=options.weights,
            image_size=options.image_size,
            embedding=options.embedding,
            crop_batch_size=options.crop_batch_size,
            louvain=options.louvain,
            louvain_workers=options.louvain_workers,
        )
    data = ImageFolderDataModule(
        data_root,
        split="train",
        image_size=module.image_size,
        patch_size=module.patch_size,
        batch_size=options.batch_size,
        num_workers=options.num_workers,
    )
    waits = DataWaitTimer()
    settings = ClusterSettings(num_clusters=num_clusters, engine=options.engine, gallery=False)
    pipeline = ClusterPaintEvaluate(output_dir, settings)
    trainer = L.Trainer(
        accelerator=options.accelerator,
        devices=options.devices,
        precision=options.precision,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[SegmentShardWriter(output_dir), pipeline, waits],
    )
    started = time.perf_counter()
    trainer.predict(module, datamodule=data, return_predictions=False)
    seconds = time.perf_counter() - started
    return seconds, module, pipeline.outcome.summary if pipeline.outcome else {}, waits.seconds


@dataclass
class TimedRound:
    """One pipeline run and the backbone-alone yardstick timed right after it (no module kept: peak memory is one run's)."""

    total: float
    yardstick: float
    weights_source: str
    device: str
    summary: dict[str, Any]
    data_wait: float
    output_dir: Path


def timed_round(options: argparse.Namespace, data_root: Path, output_dir: Path) -> TimedRound:
    """The pipeline on ``data_root``, then the bare backbone doing the same forward passes.

    Timed back to back so that a drift of the machine's speed hits both alike.
    """
    total, module, summary, data_wait = predict(options, data_root, output_dir, options.num_clusters)
    images = summary.get("images_in_run", 0)
    segment_passes = summary.get("backbone_passes", 0) - images
    segment_batch = options.batch_size  # packed: one pass per image of the batch
    if options.embedding == "crop":  # crops are embedded per predict batch, in chunks of at most crop_batch_size
        segment_batch = max(1, min(options.crop_batch_size, round(options.batch_size * segment_passes / max(images, 1))))
    yardstick = backbone_alone_seconds(module, images, options.batch_size, options.precision)
    yardstick += backbone_alone_seconds(module, segment_passes, segment_batch, options.precision)
    return TimedRound(total, yardstick, module.weights_source, str(module.device), summary, data_wait, output_dir)


def run(options: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="datus-bench-"))
    if options.data_root is None:
        source = workdir / "suim"
        prepare_suim(SUIM_SAMPLE, source, classes="coarse")
        data_root = repeated_dataset(source, options.repeat, workdir / "subset", options.max_images)
    else:
        source = data_root = Path(options.data_root)
    warm_up_seconds = None
    if options.warm_up_images:  # once per process: numba's kernel cache, scikit-learn's import, first allocations
        warm_up_root = repeated_dataset(source, 1, workdir / "warm_up_data", options.warm_up_images)
        warm_up_seconds = predict(options, warm_up_root, workdir / "warm_up", num_clusters=2)[0]
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    rounds = [timed_round(options, data_root, workdir / f"run{index}") for index in range(options.rounds)]
    percents = [100 * round_.yardstick / round_.total for round_ in rounds]
    median_round = sorted(rounds, key=lambda round_: round_.total)[len(rounds) // 2]
    total, yardstick, summary = median_round.total, median_round.yardstick, median_round.summary
    images = summary.get("images_in_run", 0)
    passes = summary.get("backbone_passes", 0)
    stages = summary.get("stage_seconds", {})
    louvain_per_image = (stages.get("louvain_cpu", 0.0) + stages.get("components_cpu", 0.0)) / max(images, 1)
    result = {
        "backbone": options.backbone,
        "weights": median_round.weights_source,
        "embedding": options.embedding,
        "image_size": options.image_size,
        "batch_size": options.batch_size,
        "data_workers": options.num_workers,
        "louvain": options.louvain,
        "precision": options.precision,
        "device": median_round.device,
        "images": images,
        "segments": summary.get("segments"),
        "noise_segments": summary.get("noise_segments"),
        "mean_valid_segments_per_image": round(summary["segments"] / images, 2),
        "mean_noise_segments_per_image": round(summary["noise_segments"] / images, 2),
        "seconds_total": round(total, 2),
        "images_per_second": round(images / total, 3),
        "warm_up_seconds": round(warm_up_seconds, 2) if warm_up_seconds is not None else None,
        "warm_up_images": options.warm_up_images,
        "stage_seconds": {"data_wait": round(median_round.data_wait, 2)}
        | {k: round(v, 2) for k, v in summary.get("stage_seconds", {}).items()},
        "backbone_passes": passes,
        "backbone_alone_seconds": round(yardstick, 2),
        "backbone_alone_images_per_second": round(images / yardstick, 3) if yardstick else None,
        "percent_of_backbone_alone": round(statistics.median(percents), 1),
        "percent_of_backbone_alone_per_round": [round(percent, 1) for percent in percents],
        "louvain_cpu_ms_per_image": round(1000 * louvain_per_image, 2),
        "images_per_second_louvain_workers_sustain": {
            workers: round(workers / louvain_per_image, 1) if louvain_per_image else None
            for workers in (1, 2, 4, 8, available_cores())
        },
        "peak_host_memory": peak_host_megabytes(),
        "peak_device_memory_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_available() else None,
        "miou": summary.get("miou"),
        "output_dir": str(median_round.output_dir),
    }
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_root", default=None, help="DatUS-layout dataset (default: the SUIM sample, prepared)")
    parser.add_argument("--repeat", type=int, default=1, help="repeat the SUIM sample this many times")
    parser.add_argument("--max_images", type=int, default=None, help="use only the first N SUIM images")
    parser.add_argument(
        "--warm_up_images",
        type=int,
        default=8,
        help="first run the whole pipeline on this many SUIM images, untimed, as the yardstick warms up (0: a cold run)",
    )
    parser.add_argument("--backbone", default="vit_small_patch16_224.dino")
    parser.add_argument("--weights", default="random")
    parser.add_argument("--seed", type=int, default=0, help="seeds the random weights and clustering")
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--embedding", choices=["crop", "packed"], default="crop")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--crop_batch_size", type=int, default=64)
    parser.add_argument("--num_workers", type=lambda value: value if value == "auto" else int(value), default="auto")
    parser.add_argument("--louvain", choices=["fast", "sknetwork"], default="fast")
    parser.add_argument(
        "--louvain_workers",
        type=lambda value: value if value == "auto" else int(value),
        default="auto",
        help="'auto' (none on CPU, measured on the first batch beside an accelerator) or a count",
    )
    parser.add_argument("--num_clusters", type=int, default=6)
    parser.add_argument("--engine", choices=["sklearn", "torch"], default="sklearn")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--devices", default="1")
    parser.add_argument(
        "--rounds", type=int, default=3, help="pipeline and yardstick this many times, alternately; medians are reported"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    options = parser.parse_args(argv)
    if options.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {options.rounds}")
    keep_freed_memory()  # as the datus command does: the pipeline and the yardstick both run with it
    result = run(options)
    text = json.dumps(result, indent=2)
    print(text)
    if options.json is not None:
        options.json.write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
