"""Peak memory and time of ``datus export`` on a synthesised run of N images (README, "Exporting for training").

The run folder is written by hand in datus's layout: ``run.json``, ``classes.json``,
``dataset.json``, a manifest of N lines (ids in nested folders, with dots and spaces), and
``masks/``, ``segments/`` and the input images as hard links to a handful of small files (so N
costs inodes, not disk). Each format is exported in its own process, with and without
``--ignore_noise`` for hf; peak memory is that process's maximum resident set (``ru_maxrss``).

    python scripts/benchmark_export.py --images 1000 100000 [--formats hf webdataset folders] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
VARIANTS = 8
"""Distinct image/mask files that the N records link to."""


def synthesise(root: Path, count: int, size: tuple[int, int] = (48, 64)) -> Path:
    """A run folder of ``count`` records over ``root/images``; returns the run folder."""
    run, images = root / "run", root / "images"
    rng = np.random.default_rng(0)
    sources = []
    for variant in range(VARIANTS):
        pixels = rng.integers(0, 255, (*size, 3), dtype=np.uint8)
        mask = (np.arange(size[1])[None, :] * 4 // size[1] + np.zeros(size, np.int64)).astype(np.uint8)
        segments = np.ones(size, np.uint8)
        segments[: size[0] // 4] = 0  # a noise band at the top
        paths = root / "sources" / f"{variant}.jpg", root / "sources" / f"{variant}-mask.png", root / "sources" / f"{variant}-seg.png"
        paths[0].parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(paths[0], quality=90)
        Image.fromarray((mask + variant) % 4).save(paths[1])
        Image.fromarray(segments).save(paths[2])
        sources.append(paths)
    run.mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"datus_version": "bench", "identity": {"model": {"backbone": "synthetic"}, "data": {"images": str(images)}}}))
    (run / "classes.json").write_text(json.dumps({"num_clusters": 4, "classes": [f"cluster {c}" for c in range(4)], "ignore_index": 255}))
    (run / "dataset.json").write_text(json.dumps({"manifest": "manifest.jsonl", "manifest_format": 2, "image_root": str(images)}))
    with open(run / "manifest.jsonl", "w", encoding="utf-8") as manifest:
        for index in range(count):
            image_id = f"part{index // 1000:03d}/img {index}.v2"
            image, mask, segments = sources[index % VARIANTS]
            for source, target in ((image, images / f"{image_id}.jpg"), (mask, run / "masks" / f"{image_id}.png"),
                                   (segments, run / "segments" / f"{image_id}.png")):  # fmt: skip
                if index % 1000 == 0 or index < VARIANTS:
                    target.parent.mkdir(parents=True, exist_ok=True)
                os.link(source, target)
            manifest.write(json.dumps({"image_id": image_id, "image": f"{image_id}.jpg", "mask": f"masks/{image_id}.png"}) + "\n")
    return run


MEASURE = """
import json, resource, sys, time
from datus.commands.cli import main
started = time.perf_counter()
main(sys.argv[1:])
print("BENCH " + json.dumps({"seconds": time.perf_counter() - started, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def measure(run: Path, out: Path, *flags: str) -> dict:
    done = subprocess.run([sys.executable, "-c", MEASURE, "export", str(run), str(out), *flags], cwd=REPO, capture_output=True, text=True, check=True)
    line = next(line for line in done.stdout.splitlines() if line.startswith("BENCH "))
    result = json.loads(line[6:])
    result["output_mb"] = sum(p.stat().st_size for p in out.rglob("*") if p.is_file() and p.stat().st_nlink == 1) / 1e6
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, nargs="+", default=[1000, 100_000])
    parser.add_argument("--formats", nargs="+", default=["hf", "webdataset", "folders"])
    parser.add_argument("--keep", type=Path, default=None, help="work here and keep the files (default: a temporary folder)")
    options = parser.parse_args()
    base = options.keep or Path(tempfile.mkdtemp(prefix="datus-export-bench-"))
    rows = []
    try:
        for count in options.images:
            root = base / f"n{count}"
            started = time.perf_counter()
            run = synthesise(root, count)
            print(f"synthesised {count} records in {time.perf_counter() - started:.1f} s", flush=True)
            cases = [(fmt, []) for fmt in options.formats]
            if "hf" in options.formats:
                cases.append(("hf", ["--ignore_noise"]))
            for fmt, extra in cases:
                out = root / f"out-{fmt}{'-noise' if extra else ''}"
                result = measure(run, out, "--format", fmt, *extra)
                row = {"images": count, "format": fmt + (" --ignore_noise" if extra else ""), **{k: round(v, 1) for k, v in result.items()}}
                rows.append(row)
                print(json.dumps(row), flush=True)
                shutil.rmtree(out)
            shutil.rmtree(root)
    finally:
        if options.keep is None:
            shutil.rmtree(base, ignore_errors=True)
    print("\n| images | format | wall s | peak RSS MB | output MB |\n|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['images']:,} | {row['format']} | {row['seconds']} | {row['peak_rss_mb']} | {row['output_mb']} |")


if __name__ == "__main__":
    main()
