"""Binary shards of per-image records: the hand-off between prediction and the dataset stages.

Each prediction batch of each rank becomes one ``.npz`` file (plain arrays, no pickle), written
atomically, so a shard on disk is always complete: the set of image ids in the shards *is* the
resume state. The dataset stages stream shards back without running the ViT again.

A shard is read as untrusted input: every array's shape and range is checked against the
others, and every image id must be a safe relative name, before anything is built from it.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from datus.core.errors import ConfigurationError
from datus.core.io import MAX_IMAGE_PIXELS, atomic_path, input_mark, open_regular, write_npz
from datus.runfolder.records import UNKNOWN_MARK, ImageRecord, segment_keys
from datus.runfolder.run import check_image_id

_PER_IMAGE = ("image_ids", "image_paths", "mask_paths", "orig_sizes", "segment_maps", "segment_counts",
              "image_embeddings", "cls_attention")
_PER_SEGMENT = ("sizes", "is_noise", "donors")
_OPTIONAL_PER_IMAGE = ("modularity", "image_marks")
"""Per-image arrays added after the first shard format: a shard without them still reads (as NaN)."""


class ShardError(ConfigurationError):
    """A shard is damaged or was not written by datus; the message names it and the fix."""


def write_shard(path: Path, records: Sequence[ImageRecord]) -> None:
    write_npz(
        path,
        {
            "image_ids": np.array([r.image_id for r in records], dtype=str),
            "image_paths": np.array([r.image_path for r in records], dtype=str),
            "mask_paths": np.array([r.mask_path for r in records], dtype=str),
            "orig_sizes": np.array([r.orig_size for r in records], dtype=np.int64).reshape(-1, 2),
            "segment_maps": np.stack([r.segment_map for r in records]).astype(np.int32),
            "segment_counts": np.array([len(r.sizes) for r in records], dtype=np.int64),
            "image_embeddings": np.stack([r.image_embedding for r in records]).astype(np.float16),
            "cls_attention": np.stack([r.cls_attention for r in records]).astype(np.float16),
            "modularity": np.array([r.modularity for r in records], dtype=np.float64),
            "image_marks": np.array([r.image_mark for r in records], dtype=np.int64).reshape(-1, 2),
            "sizes": np.concatenate([r.sizes for r in records]).astype(np.int32),
            "is_noise": np.concatenate([r.is_noise for r in records]).astype(bool),
            "donors": np.concatenate([r.donors for r in records]).astype(np.int32),
            "embeddings": np.concatenate([r.embeddings for r in records]).astype(np.float16),
        },
    )


def _load(path: Path, keys: Sequence[str], optional: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """The arrays ``keys`` (all required) and those of ``optional`` that the shard holds."""
    try:
        with open_regular(path) as stream, np.load(stream, allow_pickle=False) as data:
            missing = [key for key in keys if key not in data.files]
            if missing:
                raise ShardError(_damaged(path, f"it lacks {', '.join(missing)}"))
            return {key: data[key] for key in (*keys, *optional) if key in data.files}
    except ShardError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise ShardError(_damaged(path, f"{type(error).__name__}: {error}")) from error


def _damaged(path: Path, reason: str) -> str:
    return (
        f"{path} is damaged or was not written by datus ({reason}); delete it and run `datus predict` again with "
        "the same --output_dir: its images are predicted again"
    )


def read_records(path: Path) -> list[ImageRecord]:
    """The records of one shard, in the order they were written, after checking every array."""
    arrays = _load(path, (*_PER_IMAGE, *_PER_SEGMENT, "embeddings"), _OPTIONAL_PER_IMAGE)
    _check(path, arrays)
    modularity = arrays.get("modularity", np.full(len(arrays["image_ids"]), np.nan))
    marks = arrays.get("image_marks", np.full((len(arrays["image_ids"]), 2), -1, dtype=np.int64))
    counts = arrays["segment_counts"]
    ends = np.cumsum(counts)
    valid_counts = [int((~arrays["is_noise"][end - count : end]).sum()) for count, end in zip(counts, ends)]
    valid_ends = np.cumsum(valid_counts)
    records = []
    for i, (count, end, valid_end) in enumerate(zip(counts, ends, valid_ends)):
        start, valid_start = end - count, valid_end - valid_counts[i]
        records.append(
            ImageRecord(
                image_id=check_image_id(str(arrays["image_ids"][i]), path),
                image_path=str(arrays["image_paths"][i]),
                mask_path=str(arrays["mask_paths"][i]),
                orig_size=(int(arrays["orig_sizes"][i, 0]), int(arrays["orig_sizes"][i, 1])),
                segment_map=arrays["segment_maps"][i],
                sizes=arrays["sizes"][start:end],
                is_noise=arrays["is_noise"][start:end],
                donors=arrays["donors"][start:end],
                embeddings=arrays["embeddings"][valid_start:valid_end],
                image_embedding=arrays["image_embeddings"][i],
                cls_attention=arrays["cls_attention"][i],
                modularity=float(modularity[i]),
                image_mark=(int(marks[i, 0]), int(marks[i, 1])),
            )
        )
    return records


def _check(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Refuse arrays whose shapes or values do not fit together (a crafted or damaged shard)."""

    def refuse(reason: str) -> None:
        raise ShardError(_damaged(path, reason))

    images = len(arrays["image_ids"])
    for key in _PER_IMAGE:
        if len(arrays[key]) != images:
            refuse(f"{key} has {len(arrays[key])} entries for {images} images")
    for key in ("image_ids", "image_paths", "mask_paths"):
        if arrays[key].dtype.kind != "U":
            refuse(f"{key} is not text")
    if "image_marks" in arrays and (arrays["image_marks"].shape != (images, 2) or arrays["image_marks"].dtype.kind not in "iu"):
        refuse(f"image_marks must be {images} pairs of integers, one per image")
    if "modularity" in arrays:
        quality = arrays["modularity"]
        if quality.shape != (images,) or quality.dtype.kind != "f" or np.isinf(quality).any():
            refuse(f"modularity must be {images} finite or NaN numbers, one per image")
    counts, maps, sizes = arrays["segment_counts"], arrays["segment_maps"], arrays["orig_sizes"]
    if images == 0 or maps.ndim != 3 or min(maps.shape[1:], default=0) < 1 or sizes.shape != (images, 2):
        refuse("no images, or image arrays of the wrong shape")
    integers = ("segment_counts", "segment_maps", "orig_sizes", "sizes", "donors")
    if any(arrays[key].dtype.kind not in "iu" for key in integers) or arrays["is_noise"].dtype != bool:
        refuse(f"{', '.join(integers)} must hold integers and is_noise booleans")
    if any(arrays[key].dtype.kind != "f" for key in ("embeddings", "image_embeddings", "cls_attention")):
        refuse("embeddings and attention must hold floating-point numbers")
    if (counts < 1).any() or (sizes < 1).any() or (sizes.astype(np.float64).prod(axis=1) > MAX_IMAGE_PIXELS).any():
        refuse(f"an image without segments, without pixels, or above {MAX_IMAGE_PIXELS} pixels")
    if not (np.isfinite(arrays["embeddings"]).all() and np.isfinite(arrays["image_embeddings"]).all()):
        refuse("embeddings hold NaN or inf values")
    segments = int(counts.sum())
    for key in _PER_SEGMENT:
        if arrays[key].shape != (segments,):
            refuse(f"{key} has {arrays[key].shape} entries for {segments} segments")
    embeddings, image_embeddings = arrays["embeddings"], arrays["image_embeddings"]
    if embeddings.ndim != 2 or image_embeddings.ndim != 2 or embeddings.shape[1] != image_embeddings.shape[1]:
        refuse("embeddings of the wrong shape")
    if embeddings.shape[0] != int((~arrays["is_noise"].astype(bool)).sum()):
        refuse(f"{embeddings.shape[0]} embeddings for {int((~arrays['is_noise']).sum())} valid segments")
    if arrays["cls_attention"].shape != maps.shape:
        refuse("cls_attention does not match the segment maps")
    ends = np.cumsum(counts)
    for i, (count, end) in enumerate(zip(counts, ends)):
        segment_map = maps[i]
        if segment_map.min() < 0 or segment_map.max() >= count:
            refuse(f"image {i}'s segment map has ids outside 0..{count - 1}")
        if not np.array_equal(np.bincount(segment_map.ravel(), minlength=count), arrays["sizes"][end - count : end]):
            refuse(f"image {i}'s segment sizes do not match its segment map")
        noise = arrays["is_noise"][end - count : end]
        donors = arrays["donors"][end - count : end]
        valid = int((~noise).sum())
        if (valid and ((donors < 0) | (donors >= valid)).any()) or (not valid and (donors != -1).any()):
            refuse(f"image {i}'s donors lie outside its {valid} valid segments")


def read_image_ids(shards: Sequence[Path]) -> list[str]:
    """Ids of every image recorded in ``shards`` (reads only the small id and path arrays)."""
    return [image_id for image_id, _ in read_image_paths(shards)]


def read_image_paths(shards: Sequence[Path]) -> list[tuple[str, str]]:
    """(image id, image path) of every recorded image, refusing an id recorded twice.

    Reads only those two small arrays. Twice the same id would paint one image's masks over
    another's and leave one out, so it is refused, naming both shards.
    """
    pairs: list[tuple[str, str]] = []
    seen: dict[str, Path] = {}
    for shard in shards:
        arrays = _load(shard, ("image_ids", "image_paths"))
        for raw_id, path in zip(arrays["image_ids"], arrays["image_paths"]):
            image_id = check_image_id(str(raw_id), shard)
            if image_id in seen:
                raise ShardError(_damaged(shard, f"the image id {image_id!r} is also recorded in {seen[image_id].name}"))
            seen[image_id] = shard
            pairs.append((image_id, str(path)))
    return pairs


def finished_images(shards: Sequence[Path]) -> dict[str, str]:
    """Recorded images as {absolute image path: image id}: the resume state, so that a resumed run keeps each image's id."""
    return {os.path.abspath(path): image_id for image_id, path in read_image_paths(shards)}


TABLE_KEYS_SEED = 0
"""Seed of the row keys stored with a segment table; samples mix their own seed in (:mod:`datus.stages.clustering.streamed`)."""


def drop_stale_records(shards: Sequence[Path]) -> tuple[list[str], list[str]]:
    """Take out of ``shards`` the records of input images that changed or vanished since they were predicted.

    An image whose size or modification time differs from its record's mark is changed (it is
    then predicted again, under the same id, as an unfinished image); one that no longer exists
    has vanished (it leaves the dataset stages). A shard is rewritten atomically without those
    records, or removed when none is left: shards are datus's own files, and a run killed
    midway finds each one either old or new. Costs one ``stat`` per recorded image; a record
    without a mark (earlier versions) can only be found vanished.

    Returns:
        (changed image paths, vanished (image id, image path) pairs), as recorded.
    """
    changed: list[str] = []
    vanished: list[tuple[str, str]] = []
    for shard in shards:
        arrays = _load(shard, ("image_ids", "image_paths"), ("image_marks",))
        marks = arrays.get("image_marks")
        stale = set()
        for index, raw_path in enumerate(arrays["image_paths"]):
            path = str(raw_path)
            try:
                mark = input_mark(path)  # a file, or a member of a tar shard
            except OSError:
                vanished.append((check_image_id(str(arrays["image_ids"][index]), shard), path))
                stale.add(index)
                continue
            recorded = (int(marks[index, 0]), int(marks[index, 1])) if marks is not None and marks.shape[1:] == (2,) else UNKNOWN_MARK
            if recorded != UNKNOWN_MARK and recorded != mark:
                changed.append(path)
                stale.add(index)
        if stale:
            kept = [record for index, record in enumerate(read_records(shard)) if index not in stale]
            if kept:
                write_shard(shard, kept)
            else:
                shard.unlink()
    return changed, vanished


def check_unique_ids(shards: Sequence[Path]) -> None:
    """Refuse an image id recorded in two shards, naming both (memory: 8 bytes per image, no strings kept).

    Twice the same id would paint one image's masks over another's and leave one out.
    """
    digests, owners = [], []
    for index, shard in enumerate(shards):
        ids = _load(shard, ("image_ids",))["image_ids"]
        digests.append(np.array([id_digest(str(image_id)) for image_id in ids], dtype=np.uint64))
        owners.append(np.full(len(ids), index, dtype=np.int64))
    if not digests:
        return
    every, shard_of = np.concatenate(digests), np.concatenate(owners)
    order = np.argsort(every, kind="stable")
    repeated = np.flatnonzero(every[order][1:] == every[order][:-1])
    if len(repeated):
        first, second = shards[shard_of[order][repeated[0]]], shards[shard_of[order][repeated[0] + 1]]
        read_image_paths([first, second] if first != second else [first])  # names the id and both shards
        raise ShardError(_damaged(second, f"an image id is also recorded in {first.name}"))


def id_digest(image_id: str) -> int:
    """A 64-bit digest of an image id: sets of ids (twice recorded, twice listed) in 8 bytes each."""
    return int.from_bytes(hashlib.blake2b(image_id.encode("utf-8", "surrogateescape"), digest_size=8).digest(), "little")


@dataclass
class SegmentTable:
    """The valid segments of a set of shards, flattened: the input of clustering.

    Attributes:
        embeddings: V x D float16, usually a read-only memory map of ``segments-*.npy``.
        keys: V uint64, each segment's :func:`datus.runfolder.records.segment_keys` (with seed
            :data:`TABLE_KEYS_SEED`): who a row is, wherever it is stored.
    """

    embeddings: np.ndarray
    keys: np.ndarray


def shards_digest(shards: Sequence[Path]) -> str:
    """What a set of shards is, in 16 hex digits: names, sizes and modification times (a rewritten shard changes it)."""
    hasher = hashlib.sha256()
    for shard in shards:
        stat = shard.stat()
        hasher.update(f"{shard.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return hasher.hexdigest()[:16]


def segment_table(shards: Sequence[Path], folder: Path, name: str) -> SegmentTable:
    """The segment table of ``shards``, written to ``folder`` and memory-mapped.

    Files are named by ``name`` and :func:`shards_digest` (earlier tables of ``name`` are
    removed). A table is written afresh by each process that fits and reused only within it
    (a sweep over K fits many times): its content is derived data, and one left by an earlier
    process could have been altered in ways no cheap check sees (the run folder is untrusted),
    while rebuilding costs a read of the shards, a few percent of a fit. Within the process it is
    reused while its files are the very ones written (inode, size, modification time) and of the
    shape the shards say.

    Memory: one shard's records while building; the table itself stays on disk.
    """
    digest = shards_digest(shards)
    embeddings_path, keys_path = folder / f"segments-{name}-{digest}.npy", folder / f"keys-{name}-{digest}.npy"
    rows = sum(int((~_load(shard, ("is_noise",))["is_noise"].astype(bool)).sum()) for shard in shards)
    width = embedding_width_of(shards)
    if _WRITTEN.get(str(embeddings_path)) == _file_marks(embeddings_path, keys_path):
        stored = _mapped_table(embeddings_path, keys_path, rows, width)
        if stored is not None:
            return stored
    folder.mkdir(parents=True, exist_ok=True)
    for old in [*folder.glob(f"segments-{name}-*.npy"), *folder.glob(f"keys-{name}-*.npy")]:
        if old.is_file() and not old.is_symlink():
            old.unlink()
    # Written with write(), not through a memory map: a full disk is then an OSError (one line),
    # not a SIGBUS from a page of a sparse file that cannot be allocated.
    with atomic_path(embeddings_path) as table_file, atomic_path(keys_path) as keys_file, \
            open(table_file, "wb") as table, open(keys_file, "wb") as keys:  # fmt: skip
        _write_npy_header(table, np.float16, (rows, width))
        _write_npy_header(keys, np.uint64, (rows,))
        for shard in shards:
            for record in read_records(shard):
                if record.image_embedding.shape[0] != width:
                    raise ShardError(_damaged(shard, f"its embeddings have {record.image_embedding.shape[0]} dimensions, "
                                                     f"those of {shards[0].name} {width}"))
                table.write(np.ascontiguousarray(record.embeddings, dtype=np.float16).tobytes())
                keys.write(segment_keys(TABLE_KEYS_SEED, record.image_id, np.flatnonzero(~record.is_noise)).tobytes())
    _WRITTEN[str(embeddings_path)] = _file_marks(embeddings_path, keys_path)
    mapped = _mapped_table(embeddings_path, keys_path, rows, width)
    assert mapped is not None
    return mapped


_WRITTEN: dict[str, tuple[int, ...] | None] = {}
"""Tables this process wrote: path -> :func:`_file_marks` right after writing."""


def _file_marks(*paths: Path) -> tuple[int, ...] | None:
    """(inode, size, modification time) of each file, None when one is missing: a replaced or
    rewritten file has other marks."""
    try:
        return tuple(value for path in paths for status in [path.stat()] for value in (status.st_ino, status.st_size, status.st_mtime_ns))
    except OSError:
        return None


def _write_npy_header(stream: Any, dtype: type, shape: tuple[int, ...]) -> None:
    """The ``.npy`` header of a C-ordered array, so that its rows can follow with ``write()``."""
    np.lib.format.write_array_header_2_0(stream, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape})


def embedding_width_of(shards: Sequence[Path]) -> int:
    """Embedding width of the first shard (0 without shards)."""
    return int(_load(shards[0], ("image_embeddings",))["image_embeddings"].shape[1]) if shards else 0


def _mapped_table(embeddings_path: Path, keys_path: Path, rows: int, width: int) -> SegmentTable | None:
    """The stored table, memory-mapped, or None when absent or not what the shards say it must be."""
    if not (embeddings_path.is_file() and keys_path.is_file()):  # a FIFO in its place would block
        return None
    try:
        embeddings = np.load(embeddings_path, mmap_mode="r", allow_pickle=False)
        keys = np.load(keys_path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None
    if embeddings.dtype != np.float16 or embeddings.shape != (rows, width) or keys.dtype != np.uint64 or keys.shape != (rows,):
        return None
    return SegmentTable(embeddings, keys)


def first_mask_path(shards: Sequence[Path]) -> str | None:
    """The first ground-truth path recorded in ``shards`` (reads only the small path arrays)."""
    for shard in shards:
        for path in _load(shard, ("mask_paths",))["mask_paths"]:
            if str(path):
                return str(path)
    return None
