"""datus against the shared reference implementation: the same images and weights, whole processes.

    python scripts/compare_reference.py                      # 30 SUIM images, seeded ViT-S/16, K = 6
    python scripts/compare_reference.py --images 30 --rounds 3 --json runs/compare.json

The reference (``../shared/reference/ref_datus.py``, a plain vectorised implementation of the
algorithm with the official numerical choices; it needs ``opencv-python-headless``) and
``datus predict`` in crop and packed mode run one after the other, each as its own process,
on the same images and the same seeded random ViT written to a file, and their wall times are
compared (images/s, and the ratio reference time / datus time: above 1 means datus is faster).
Rounds are interleaved so that drifts of the machine's speed hit every contender alike; the
median round is reported. datus runs with its defaults (colour masks, overlays, report,
both protocols); the reference writes 224 px masks and evaluates one protocol.

It also checks fidelity where the two must agree: the partitions of each image from the same
keys (datus's segment discovery fed the reference's keys).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO.parent / "shared" / "reference" / "ref_datus.py"
SUIM_SAMPLE = REPO.parent / "shared" / "data" / "suim-sample"


def prepare_images(workdir: Path, count: int) -> tuple[Path, Path]:
    """The first ``count`` SUIM images (sorted by name) with coarse masks, flat, for both tools."""
    prepared = workdir / "suim"
    subprocess.run([sys.executable, "-m", "datus", "prepare", "suim", str(SUIM_SAMPLE), str(prepared)], check=True,
                   capture_output=True)  # fmt: skip
    images, masks = workdir / "images", workdir / "masks"
    images.mkdir()
    masks.mkdir()
    for path in sorted((prepared / "train" / "images").iterdir())[:count]:
        shutil.copy(path, images / path.name)
        shutil.copy(prepared / "train" / "true_masks" / f"{path.stem}.png", masks / f"{path.stem}.png")
    (workdir / "classes.json").write_text((prepared / "classes.json").read_text())
    return images, masks


def write_weights(path: Path, arch: str, seed: int) -> None:
    """A seeded random timm ViT's state dict, the same network for both tools."""
    import timm
    import torch

    torch.manual_seed(seed)
    torch.save(timm.create_model(arch, pretrained=False, num_classes=0).state_dict(), path)


def timed(command: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    completed = subprocess.run(command, env=env, capture_output=True, text=True)
    if completed.returncode != 0:
        raise RuntimeError(f"{command[:4]} failed:\n{completed.stderr[-3000:]}")
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=30)
    parser.add_argument("--arch", default="vit_small_patch16_224")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--k", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--modes", nargs="+", default=["crop", "packed"], choices=["crop", "packed"])
    parser.add_argument("--json", type=Path, default=None)
    options = parser.parse_args(argv)
    if not REFERENCE.is_file() or not SUIM_SAMPLE.is_dir():
        raise SystemExit(f"needs {REFERENCE} and {SUIM_SAMPLE} (this project's machines)")
    workdir = Path(tempfile.mkdtemp(prefix="datus-vs-reference-"))
    images, masks = prepare_images(workdir, options.images)
    weights = workdir / "weights.pth"
    write_weights(weights, options.arch, options.seed)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    commands = {
        "reference": [sys.executable, str(REFERENCE), "--mode", "fast", "--images", str(images), "--masks", str(masks),
                      "--arch", options.arch, "--weights", str(weights), "--k", str(options.k), "--discovery-channels",
                      "rgb", "--out", "{out}"],
    }  # fmt: skip
    for mode in options.modes:
        commands[f"datus {mode}"] = [
            sys.executable, "-m", "datus", "predict", "--data.root", str(images), "--data.mask_dir", str(masks),
            "--model.backbone", f"{options.arch}.dino", "--model.weights", str(weights), "--model.embedding", mode,
            "--cluster.num_clusters", str(options.k), "--eval.num_classes", "6", "--trainer.accelerator", "cpu",
            "--trainer.enable_progress_bar", "false", "--output_dir", "{out}",
        ]  # fmt: skip
    seconds: dict[str, list[float]] = {name: [] for name in commands}
    for round_index in range(options.rounds):
        for name, command in commands.items():
            out = workdir / f"{name.replace(' ', '_')}_{round_index}"
            seconds[name].append(timed([part.replace("{out}", str(out)) for part in command], env))
            print(f"round {round_index}: {name} {seconds[name][-1]:.1f} s", file=sys.stderr)
    median = {name: statistics.median(values) for name, values in seconds.items()}
    result: dict[str, Any] = {
        "images": options.images,
        "arch": options.arch,
        "k": options.k,
        "rounds": options.rounds,
        "seconds": {name: [round(v, 2) for v in values] for name, values in seconds.items()},
        "images_per_second": {name: round(options.images / value, 3) for name, value in median.items()},
        "speed_vs_reference": {
            name: round(median["reference"] / value, 2) for name, value in median.items() if name != "reference"
        },
        "reference_segments": json.loads((workdir / "reference_0" / "result.json").read_text())["segments_total"],
        "fidelity": partitions_from_reference_keys(images, weights, options.arch, workdir),
        "workdir": str(workdir),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if options.json is not None:
        options.json.write_text(text + "\n")
    return result


def partitions_from_reference_keys(images: Path, weights: Path, arch: str, workdir: Path) -> dict[str, Any]:
    """datus's discovery (both Louvain engines) on the reference's own keys, per image: same partitions?"""
    sys.path.insert(0, str(REFERENCE.parent))
    import ref_datus as reference  # the yardstick, only ever imported by this script

    from datus.discovery.communities import discover_segments
    from datus.discovery.ops import key_adjacency, pack_adjacency

    model = reference.build_backbone(arch, weights=weights)
    grid = (reference.INPUT_SIZE // reference.patch_size_of(model),) * 2
    same = {"fast": 0, "sknetwork": 0}
    paths = reference.list_images(images)
    for path in paths:
        keys = reference.last_layer_keys(model, reference.discovery_input(reference.read_bgr(path), "rgb")[None])
        expected = reference.discover_segments(keys[0].numpy(), grid)
        packed = pack_adjacency(key_adjacency(keys))[0]
        for engine in same:
            partition = discover_segments(packed, grid, 1.0, reference.NOISE_MAX_PATCHES, engine)
            ours = np.where(partition.is_noise[partition.segment_map], -1, partition.segment_map)
            same[engine] += bool(reference.same_partition(ours, expected))
    return {"images": len(paths), "identical_partitions": same}


if __name__ == "__main__":
    main()
