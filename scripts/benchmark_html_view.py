"""Time and memory of the HTML view's pages for a synthetic manifest (README, "Browse the results").

    python scripts/benchmark_html_view.py --images 10000 100000

Writes a manifest of N lines (ids in nested folders, absolute image paths) into a temporary
results folder and times ``write_html_view``; memory is the peak of Python allocations during
a second call (tracemalloc), which the page streaming keeps to one page whatever N is.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import tracemalloc
from pathlib import Path

from datus.outputs.html_view import PAGE_SIZE, write_html_view
from datus.runfolder.run import Results


def measure(images: int, folder: Path) -> tuple[float, float, int]:
    (folder / "overlay").mkdir(parents=True)
    (folder / "color").mkdir()
    with open(folder / "manifest.jsonl", "w", encoding="utf-8") as stream:
        for n in range(images):
            image_id = f"folder {n % 97}/image_{n:07d}"
            stream.write(
                json.dumps({"image_id": image_id, "image": f"/data/images/{image_id}.jpg", "mask": f"masks/{image_id}.png"})
                + "\n"
            )
    summary = {"images_in_run": images, "segments": 0, "noise_segments": 0, "num_clusters": 27, "skipped": []}
    started = time.perf_counter()
    pages = write_html_view(Results(folder, folder), summary)
    seconds = time.perf_counter() - started
    tracemalloc.start()  # a second, traced call: tracing slows Python down by half
    write_html_view(Results(folder, folder), summary)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return seconds, peak / 2**20, pages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, nargs="+", default=[10_000, 100_000])
    args = parser.parse_args()
    for images in args.images:
        with tempfile.TemporaryDirectory() as folder:
            seconds, peak, pages = measure(images, Path(folder) / "results")
            print(f"{images} images, {pages} pages of {PAGE_SIZE}: {seconds:.2f} s, peak Python memory {peak:.1f} MiB")


if __name__ == "__main__":
    main()
