"""Cost of the dataset-level stages (6-8) as a run grows: seconds per stage, CPU/wall, peak memory.

A run of ``--images`` realistic records is synthesised through the product's own shard writer
(no ViT): a 28 x 28 patch grid with ``--valid`` valid segments and ``--noise`` noise segments per
image, ``--dim``-dimensional L2-normalised fp16 embeddings drawn around 27 hidden centres, and
images of ``--image_size`` pixels (a few real JPEG files that the records point to in turn, so
that overlays decode real pictures). Then ``datus cluster`` runs on it as a user would, twice: a
full run, then a rerun with nothing changed.

Peak memory is that of the whole process tree (main process and its workers), sampled every
``--sample_every`` seconds as ``Pss_Anon + Pss_Shmem`` from ``/proc/PID/smaps_rollup``:
proportional, so that pages forked workers share count once, and without the page cache of
memory-mapped files, which the kernel can drop at any time. Reading ``smaps_rollup`` walks the
page tables, so sampling costs CPU time on the same cores (about 0.2 of a core at 0.1 s); the
CPU time of the sampling is printed beside the figures.

    python scripts/benchmark_scale.py --images 2500 10000           # two sizes: the growth law
    python scripts/benchmark_scale.py --images 100000 --keep runs/scale   # ~8 GB of shards

Synthesised runs are kept under ``--keep`` (reused when present) or made in a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from datus import __version__  # noqa: E402
from datus.core.io import write_json  # noqa: E402
from datus.runfolder.records import ImageRecord  # noqa: E402
from datus.runfolder.run import RUN_FILE, Run  # noqa: E402
from datus.runfolder.shards import write_shard  # noqa: E402

GRID = 28
HIDDEN_CENTRES = 27
PICTURES = 8
"""Distinct image files the records point to (decoding cost is per record all the same)."""


def segment_map(rng: np.random.Generator, valid: int, noise: int) -> tuple[np.ndarray, np.ndarray]:
    """An h x w segment map with ``valid`` segments of > 5 patches and ``noise`` one-patch ones.

    Returns the map (ids by first appearance in raster order, like discovery's) and the noise flags.
    """
    cells = int(np.ceil(np.sqrt(valid)))
    rows = np.minimum(np.arange(GRID) * cells // GRID, cells - 1)
    blocks = (rows[:, None] * cells + rows[None, :]) % valid
    flat = blocks.ravel().copy()
    spots = rng.choice(GRID * GRID, size=noise, replace=False)
    flat[spots] = valid + np.arange(noise)
    _, first = np.unique(flat, return_index=True)
    order = np.argsort(first)
    renumber = np.empty(valid + noise, dtype=np.int32)
    renumber[np.unique(flat)[order]] = np.arange(valid + noise, dtype=np.int32)
    grid = renumber[flat].reshape(GRID, GRID)
    sizes = np.bincount(grid.ravel(), minlength=valid + noise)
    return grid, sizes <= 5


def synthesise(root: Path, images: int, valid: int, noise: int, dim: int, size: tuple[int, int], per_shard: int) -> None:
    """A datus run folder of ``images`` records written with :func:`datus.runfolder.shards.write_shard`."""
    rng = np.random.default_rng(0)
    pictures = root.parent / f"pictures-{size[0]}x{size[1]}"
    pictures.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(PICTURES):
        path = pictures / f"picture{index}.jpg"
        if not path.is_file():
            pixels = rng.integers(0, 255, (size[0] // 8, size[1] // 8, 3), dtype=np.uint8)
            Image.fromarray(pixels).resize((size[1], size[0]), Image.Resampling.BICUBIC).save(path, quality=90)
        paths.append(str(path))
    centres = rng.normal(size=(HIDDEN_CENTRES, dim)).astype(np.float32)
    write_json(root / RUN_FILE, {"datus_version": __version__, "identity": {"model": {"synthetic": True}, "data": None}})
    run = Run(root)
    run.shards_dir.mkdir(parents=True, exist_ok=True)
    maps = [segment_map(rng, valid, noise) for _ in range(16)]
    for sequence, start in enumerate(range(0, images, per_shard)):
        records = []
        for index in range(start, min(images, start + per_shard)):
            grid, is_noise = maps[index % len(maps)]
            sizes = np.bincount(grid.ravel()).astype(np.int32)
            kept = np.flatnonzero(~is_noise)
            donors = np.where(is_noise, 0, np.cumsum(~is_noise) - 1).astype(np.int32)
            points = centres[rng.integers(0, HIDDEN_CENTRES, len(kept))] + 0.8 * rng.normal(size=(len(kept), dim)).astype(np.float32)
            points /= np.linalg.norm(points, axis=1, keepdims=True)
            whole = points.mean(0)
            records.append(
                ImageRecord(
                    image_id=f"img{index:07d}", image_path=paths[index % PICTURES], mask_path="", orig_size=size,
                    segment_map=grid, sizes=sizes, is_noise=is_noise, donors=donors, embeddings=points.astype(np.float16),
                    image_embedding=(whole / np.linalg.norm(whole)).astype(np.float16),
                    cls_attention=np.full((GRID, GRID), 1 / GRID**2, np.float16), modularity=0.3,
                )
            )  # fmt: skip
        write_shard(run.shard_path(0, sequence), records)


def tree_memory(root_pid: int) -> int:
    """``Pss_Anon + Pss_Shmem`` bytes of ``root_pid`` and all its descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                parent = int(Path(f"/proc/{entry.name}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    total, stack = 0, [root_pid]
    while stack:
        pid = stack.pop()
        stack.extend(children.get(pid, []))
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith(("Pss_Anon:", "Pss_Shmem:")):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


def timed_cluster(run_dir: Path, flags: list[str], sample_every: float) -> dict[str, Any]:
    """Run ``datus cluster`` as a subprocess; wall, CPU and peak tree memory."""
    command = [sys.executable, "-m", "datus", "cluster", "--run", str(run_dir), *flags]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = [0]

    sampling = [0.0]

    def sample() -> None:
        while process.poll() is None:
            peak[0] = max(peak[0], tree_memory(process.pid))
            time.sleep(sample_every)
        sampling[0] = time.thread_time()

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output, _ = process.communicate()
    wall = time.perf_counter() - started
    sampler.join()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if process.returncode != 0:
        raise SystemExit(f"datus cluster failed ({process.returncode}):\n{output[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": wall, "cpu_s": cpu, "cpu_per_wall": cpu / wall, "peak_tree_bytes": peak[0], "sampling_cpu_s": sampling[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, nargs="+", default=[2500, 10000])
    parser.add_argument("--valid", type=int, default=48, help="valid segments per image")
    parser.add_argument("--noise", type=int, default=10, help="noise segments per image")
    parser.add_argument("--dim", type=int, default=768, help="embedding width (ViT-B: 768)")
    parser.add_argument("--image_size", type=int, nargs=2, default=[480, 640], metavar=("H", "W"))
    parser.add_argument("--per_shard", type=int, default=32, help="records per shard (a prediction batch)")
    parser.add_argument("--num_clusters", type=int, default=27)
    parser.add_argument("--sample_every", type=float, default=0.5, help="seconds between memory samples")
    parser.add_argument("--keep", type=Path, default=None, help="keep (and reuse) synthesised runs in this folder")
    parser.add_argument("--flags", nargs=argparse.REMAINDER, default=[], help="more `datus cluster` flags")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        base = options.keep or Path(scratch)
        rows = []
        for images in options.images:
            run_dir = base / f"run-{images}-{options.valid}x{options.dim}"
            if not Run(run_dir).shards():
                started = time.perf_counter()
                synthesise(run_dir, images, options.valid, options.noise, options.dim, tuple(options.image_size), options.per_shard)
                print(f"synthesised {images} images in {time.perf_counter() - started:.0f} s", flush=True)
            shutil.rmtree(run_dir / "clusters", ignore_errors=True)  # a full run, not a rerun of an earlier one
            flags = ["--cluster.num_clusters", str(options.num_clusters), *options.flags]
            full = timed_cluster(run_dir, flags, options.sample_every)
            stages = json.loads((Run(run_dir).cluster_results(options.num_clusters).file("summary.json")).read_text())["stage_seconds"]
            rerun = timed_cluster(run_dir, flags, options.sample_every)
            row = {"images": images, "segments": images * options.valid, "full": full, "stages": stages, "rerun": rerun}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n{'images':>8} {'segments':>9} {'wall s':>8} {'CPU/wall':>8} {'peak MB':>8} {'rerun s':>8} {'rerun %':>7}")
    for row in rows:
        full, rerun = row["full"], row["rerun"]
        print(
            f"{row['images']:>8} {row['segments']:>9} {full['wall_s']:>8.1f} {full['cpu_per_wall']:>8.2f} "
            f"{full['peak_tree_bytes'] / 2**20:>8.0f} {rerun['wall_s']:>8.1f} {100 * rerun['wall_s'] / full['wall_s']:>6.1f}%"
        )
        print("         stages: " + ", ".join(f"{k} {v:.1f}" for k, v in row["stages"].items()))
        print(f"         memory sampling used {full['sampling_cpu_s']:.1f} CPU s beside the full run")


if __name__ == "__main__":
    main()
