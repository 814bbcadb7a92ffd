"""Binary shards of per-image records: the hand-off between prediction and clustering.

Each prediction batch of each rank becomes one ``.npz`` file (plain arrays, no pickle),
written atomically, so a shard on disk is always complete: the set of image ids in the shards
*is* the resume state. Clustering streams the shards back without running the ViT again.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from datus.io import CLASSES_FILE, write_npz
from datus.module import ImageRecord

SHARD_DIR = "shards"
_SHARD_NAME = re.compile(r"rank(\d+)-(\d+)\.npz$")


def shard_path(run_dir: Path, rank: int, sequence: int) -> Path:
    return run_dir / SHARD_DIR / f"rank{rank:03d}-{sequence:07d}.npz"


def list_shards(run_dir: Path) -> list[Path]:
    """All complete shards of a run, in a stable order (rank, then sequence)."""
    folder = run_dir / SHARD_DIR
    if not folder.is_dir():
        return []
    named = [(m, p) for p in folder.iterdir() if (m := _SHARD_NAME.match(p.name))]
    return [p for m, p in sorted(named, key=lambda item: (int(item[0][1]), int(item[0][2])))]


def next_sequence(run_dir: Path, rank: int) -> int:
    """First unused shard number for ``rank`` (a resumed run appends, never overwrites)."""
    numbers = [int(m[2]) for p in list_shards(run_dir) if (m := _SHARD_NAME.match(p.name)) and int(m[1]) == rank]
    return max(numbers, default=-1) + 1


def write_shard(path: Path, records: Sequence[ImageRecord]) -> None:
    write_npz(
        path,
        {
            "image_ids": np.array([r.image_id for r in records], dtype=str),
            "image_paths": np.array([r.image_path for r in records], dtype=str),
            "mask_paths": np.array([r.mask_path for r in records], dtype=str),
            "orig_sizes": np.array([r.orig_size for r in records], dtype=np.int64).reshape(-1, 2),
            "segment_maps": np.stack([r.segment_map for r in records]).astype(np.int32),
            "cls_attention": np.stack([r.cls_attention for r in records]).astype(np.float16),
            "segment_counts": np.array([len(r.sizes) for r in records], dtype=np.int64),
            "sizes": np.concatenate([r.sizes for r in records]).astype(np.int32),
            "is_noise": np.concatenate([r.is_noise for r in records]).astype(bool),
            "embeddings": np.concatenate([r.embeddings for r in records]).astype(np.float16),
        },
    )


def read_records(path: Path) -> list[ImageRecord]:
    """The records of one shard, in the order they were written."""
    with np.load(path, allow_pickle=False) as data:
        arrays = {key: data[key] for key in data.files}
    ends = np.cumsum(arrays["segment_counts"])
    starts = ends - arrays["segment_counts"]
    return [
        ImageRecord(
            image_id=str(arrays["image_ids"][i]),
            image_path=str(arrays["image_paths"][i]),
            mask_path=str(arrays["mask_paths"][i]),
            orig_size=(int(arrays["orig_sizes"][i, 0]), int(arrays["orig_sizes"][i, 1])),
            segment_map=arrays["segment_maps"][i],
            sizes=arrays["sizes"][starts[i] : ends[i]],
            is_noise=arrays["is_noise"][starts[i] : ends[i]],
            embeddings=arrays["embeddings"][starts[i] : ends[i]],
            cls_attention=arrays["cls_attention"][i],
        )
        for i in range(len(ends))
    ]


def iter_records(shards: Sequence[Path]) -> Iterator[ImageRecord]:
    for shard in shards:
        yield from read_records(shard)


def read_image_paths(shards: Sequence[Path]) -> list[tuple[str, str]]:
    """(image id, image path) of every recorded image (reads only those two small arrays)."""
    pairs: list[tuple[str, str]] = []
    for shard in shards:
        with np.load(shard, allow_pickle=False) as data:
            pairs.extend((str(i), str(p)) for i, p in zip(data["image_ids"], data["image_paths"]))
    return pairs


def read_image_ids(shards: Sequence[Path]) -> list[str]:
    """Ids of every image recorded in ``shards`` (reads only the small id arrays)."""
    ids: list[str] = []
    for shard in shards:
        with np.load(shard, allow_pickle=False) as data:
            ids.extend(str(i) for i in data["image_ids"])
    return ids


@dataclass
class SegmentTable:
    """All segments of a set of shards, flattened: the input of clustering."""

    embeddings: np.ndarray  # S x D float16
    is_noise: np.ndarray  # S bool
    num_images: int


def read_segment_table(shards: Sequence[Path]) -> SegmentTable:
    """The segment embeddings of ``shards``, ordered by image id then segment id.

    The order does not depend on how images were spread over ranks and batches, so a fit on
    the table gives the same clusters for a 1-rank and an N-rank run of the same images.
    """
    pieces: list[tuple[str, np.ndarray, np.ndarray]] = []
    for shard in shards:
        with np.load(shard, allow_pickle=False) as data:
            ends = np.cumsum(data["segment_counts"])
            embeddings, noise = data["embeddings"], data["is_noise"]
            for image_id, start, end in zip(data["image_ids"], ends - data["segment_counts"], ends):
                pieces.append((str(image_id), embeddings[start:end], noise[start:end]))
    if not pieces:
        return SegmentTable(np.zeros((0, 0), np.float16), np.zeros(0, bool), 0)
    pieces.sort(key=lambda piece: piece[0])
    return SegmentTable(
        np.concatenate([p[1] for p in pieces]), np.concatenate([p[2] for p in pieces]), len(pieces)
    )


def find_class_file(records: Sequence[ImageRecord]) -> Path | None:
    """``classes.json`` of a DatUS-layout dataset: the masks live in ROOT/<split>/true_masks."""
    for record in records:
        if record.mask_path:
            for folder in list(Path(record.mask_path).parents)[:4]:
                if (folder / CLASSES_FILE).is_file():
                    return folder / CLASSES_FILE
            return None
    return None
