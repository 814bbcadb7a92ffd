"""Decoding speed of the predict data module from tar shards against the same images as files (README, "Tar shards").

    python scripts/benchmark_tar_input.py --images 2000 --workers 1 --rounds 3

Writes N synthetic 500 x 375 JPEGs (smooth colour fields with noise, about 40 KB each, like
photos) once as files and once as WebDataset shards of ``--per_shard`` images, then times the
data module's loader alone (listing or indexing, decoding, resizing to the model input, no
model) over each, alternating the two for ``--rounds`` rounds; the median is reported. With
the SUIM sample beside the repository (``../shared/data/suim-sample``) its 42 photos are timed
the same way (one shard). The page cache is warm after the first round: the figures compare
the reading paths, not a cold disk, where sequential shard reads gain more.
"""

from __future__ import annotations

import argparse
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from datus.datamodules.images import ImageFolderDataModule

SUIM = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "suim-sample" / "train_val" / "images"


def write_images(folder: Path, count: int, size: tuple[int, int] = (375, 500)) -> list[Path]:
    rng = np.random.default_rng(0)
    height, width = size
    rows, columns = np.mgrid[0:height, 0:width]
    paths = []
    for index in range(count):
        phase = rng.uniform(0, 2 * np.pi, 3)
        field = np.stack([np.sin(rows / (20 + 7 * c) + columns / (31 + 5 * c) + phase[c]) for c in range(3)], axis=-1)
        pixels = np.clip(127 + 100 * field + rng.normal(0, 8, field.shape), 0, 255).astype(np.uint8)
        path = folder / f"{index // 1000:03d}" / f"image_{index:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(path)
    return paths


def write_shards(paths: list[Path], root: Path, folder: Path, per_shard: int) -> Path:
    shards = folder / "shards"
    shards.mkdir(parents=True)
    for start in range(0, len(paths), per_shard):
        with tarfile.open(shards / f"train-{start // per_shard:04d}.tar", "w", format=tarfile.GNU_FORMAT) as archive:
            for path in paths[start : start + per_shard]:
                archive.add(path, arcname=path.relative_to(root).as_posix())
    return shards


def decode_rate(root: Path, workers: int, batch_size: int) -> tuple[float, float, int]:
    """(seconds to list or index, images/s of the loader, images) for one pass over ``root``."""
    started = time.perf_counter()
    data = ImageFolderDataModule(root, image_size=224, patch_size=16, batch_size=batch_size, num_workers=workers, pin_memory=False)
    listed = time.perf_counter() - started
    images, started = 0, time.perf_counter()
    for batch in data.predict_dataloader():
        assert not batch["skipped"], batch["skipped"][:1]
        images += len(batch["image_id"])
    return listed, images / (time.perf_counter() - started), images


def compare(name: str, files: Path, shards: Path, workers: int, batch_size: int, rounds: int) -> None:
    results: dict[str, list[tuple[float, float, int]]] = {"files": [], "tars": []}
    for _ in range(rounds):
        for kind, root in (("files", files), ("tars", shards)):
            results[kind].append(decode_rate(root, workers, batch_size))
    for kind, rows in results.items():
        rates = [rate for _, rate, _ in rows]
        listed = statistics.median(seconds for seconds, _, _ in rows)
        print(
            f"{name:<28} {kind:<6} {rows[0][2]:>6} images  list/index {listed:6.3f} s  "
            f"{statistics.median(rates):7.1f} images/s  (rounds {min(rates):.1f}-{max(rates):.1f})"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--per_shard", type=int, default=500)
    parser.add_argument("--workers", type=int, default=1, help="loader worker processes (0: in the main process)")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary)
        paths = write_images(folder / "files", arguments.images)
        shards = write_shards(paths, folder / "files", folder, arguments.per_shard)
        label = f"synthetic 500x375 JPEG, {arguments.workers} worker(s)"
        compare(label, folder / "files", shards, arguments.workers, arguments.batch_size, arguments.rounds)
        if SUIM.is_dir():
            suim = sorted(SUIM.glob("*.jpg"))
            suim_shards = write_shards(suim, SUIM, folder / "suim", len(suim))
            compare(f"SUIM sample, {arguments.workers} worker(s)", SUIM, suim_shards, arguments.workers, arguments.batch_size, arguments.rounds)


if __name__ == "__main__":
    main()
