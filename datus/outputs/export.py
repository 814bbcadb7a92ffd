"""``datus export``: a finished run's pseudo masks in the formats training code reads.

- ``hf``: Parquet shards (``data/train-*.parquet``, ``data/validation-*.parquet``) that
  ``datasets.load_dataset("parquet", data_dir=OUT)`` reads as ``image`` and ``label`` Images
  (the features are declared in each file's Arrow schema) and an ``image_id`` string, plus
  ``id2label.json``;
- ``webdataset``: tars (``train-000000.tar``, ``val-000000.tar``) of ``<key>.<ext>`` (the original
  image bytes), ``<key>.seg.png`` and ``<key>.json``;
- ``folders``: ``images/<name><ext>`` and ``masks/<name>.png`` (flat, one stem per image: what
  mmsegmentation's ``img_dir``/``ann_dir`` and detectron2's ``load_sem_seg`` expect) with
  ``splits/train.txt`` and ``splits/val.txt``.

Every format gets a dataset card (``README.md``), ``id2label.json`` and ``export.json`` (what was
exported, the skipped images and why; it also marks the folder as datus's, so a later export of
the same format may replace it and any other non-empty folder is refused).

Keys and names: :func:`encode_key` percent-encodes every byte of the id except ASCII letters,
digits, ``-`` and ``_`` (so ``/``, ``.``, spaces and non-ASCII never reach a file name or a
webdataset key, which splits at the first dot); ``urllib.parse.unquote`` gives the id back.

Streaming: the manifest is read line by line (twice: once for the split, which keeps 8 bytes
per image, then to write); memory holds one Parquet row group (``ROW_GROUP_BYTES``) or one
sample, whatever the number of images. Every input is untrusted: files are opened with
:func:`datus.core.io.open_regular` and decoded before they are written; a missing or damaged image or
mask is skipped, logged and listed in ``export.json``. Imports numpy, PIL, and pyarrow (hf only).
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import re
import shutil
import tarfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
from PIL import Image

from datus import __version__
from datus.core.errors import ConfigurationError
from datus.core.files import EXPORT_MARKER
from datus.core.io import (
    DECODE_ERRORS, TEMPORARY_NAME, UnreadableFile, atomic_path, check_pixels, decode_reason, json_text, open_regular,
    read_json, read_label_png, write_json, write_text,
)  # fmt: skip
from datus.runfolder.shards import id_digest
from datus.outputs.manifest import ManifestEntry, Split, image_root_of, manifest_lines, read_entry
from datus.runfolder.run import (
    CLASSES_FILE, CONFIG_FILE, MANIFEST_FILE, METRICS_FILE, RUN_FILE, SEGMENTS, SUMMARY_FILE, Results, Run,
)  # fmt: skip

log = logging.getLogger(__name__)

FORMATS = ("hf", "webdataset", "folders")
EXPORT_FILE = EXPORT_MARKER
"""In every export: what was exported and skipped; marks the folder as a datus export of one format."""
CARD_FILE = "README.md"
ID2LABEL_FILE = "id2label.json"
ROW_GROUP_BYTES = 32 * 2**20
"""Bytes of image and mask data per Parquet row group (at most): what the hf writer holds in memory."""
ROW_GROUP_ROWS = 100
"""Rows per Parquet row group at most (what ``datasets`` writes for image datasets: random access stays cheap)."""
DEFAULT_SHARD_BYTES = {"hf": 500 * 10**6, "webdataset": 10**9}
MAX_NAME_BYTES = 200
"""Longest file name stem in ``folders`` (a longer encoded id is cut and given a hash of the id)."""
SPLIT_NAMES = {"hf": {"train": "train", "val": "validation"}, "webdataset": {"train": "train", "val": "val"}}
OWNED_NAMES = {"webdataset": re.compile(r"(train|val)-\d{6}\.tar")}
"""Names an export of that format writes besides its recorded entries (a killed export had not recorded them yet)."""
OWNED_FOLDERS = {
    "data": re.compile(r"(train|validation)-\d{5}\.parquet"),
    "images": re.compile(r"[^/]+\.(jpe?g|png|bmp|tiff?|webp)", re.IGNORECASE),
    "masks": re.compile(r"[^/]+\.png"),
    "splits": re.compile(r"(train|val)\.txt"),
}
"""The folders an export writes, and the only names it writes in them: anything else there is the user's."""
OWNED_FILES = frozenset({EXPORT_FILE, CARD_FILE, ID2LABEL_FILE, "index.jsonl"})
"""Top-level files an export writes (recorded names outside these, the folders and OWNED_NAMES are not datus's)."""
IMAGE_FEATURE = {"_type": "Image"}
HF_FEATURES = {"image": IMAGE_FEATURE, "label": IMAGE_FEATURE, "image_id": {"dtype": "string", "_type": "Value"}}


def encode_key(image_id: str) -> str:
    """The id as a key without ``/``, ``.``, spaces or non-ASCII: ``urllib.parse.unquote(key) == image_id``."""
    return quote(image_id, safe="", errors="surrogateescape").replace(".", "%2E").replace("~", "%7E")


def file_stem(image_id: str) -> str:
    """:func:`encode_key`, cut to :data:`MAX_NAME_BYTES` with a hash of the id when longer (``index.jsonl`` maps back)."""
    key = encode_key(image_id)
    if len(key) <= MAX_NAME_BYTES:
        return key
    digest = hashlib.blake2b(image_id.encode("utf-8", "surrogateescape"), digest_size=8).hexdigest()
    return f"{key[: MAX_NAME_BYTES - 20].rstrip('%0123456789ABCDEF')}~{digest}"


@dataclass(frozen=True)
class ExportSettings:
    format: str
    val_fraction: float = 0.1
    seed: int = 0
    ignore_noise: bool = False
    ignore_value: int = 255
    shard_size: int | None = None
    """Bytes per Parquet file or tar (default: 500 MB for hf, 1 GB for webdataset)."""
    link: str = "hard"
    """folders: ``hard`` links to the run's files where the file system allows (else copies), or ``copy``."""

    def check(self) -> None:
        if self.format not in FORMATS:
            raise ConfigurationError(f"--format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if not 0 <= self.val_fraction < 1:
            raise ConfigurationError(f"--val_fraction must be in [0, 1), got {self.val_fraction}")
        if not 0 <= self.ignore_value <= 65535:
            raise ConfigurationError(f"--ignore_value must be in 0..65535, got {self.ignore_value}")
        if self.shard_size is not None and self.shard_size < 1:
            raise ConfigurationError(f"--shard_size must be >= 1 byte, got {self.shard_size}")
        if self.link not in ("hard", "copy"):
            raise ConfigurationError(f"--link must be hard or copy, got {self.link!r}")


@dataclass
class Sample:
    """One image ready to write: original image bytes and suffix, the mask as PNG bytes."""

    entry: ManifestEntry
    split: str
    image_bytes: bytes
    suffix: str
    mask_png: bytes
    size: tuple[int, int]
    mask_changed: bool
    mask_path: Path
    """The run's mask file that ``mask_png`` was read from (what ``folders`` hard-links)."""


@dataclass
class Counts:
    images: dict[str, int] = field(default_factory=lambda: {"train": 0, "val": 0})
    skipped: list[dict[str, str]] = field(default_factory=list)
    noise_pixels: int = 0
    linked: int = 0
    copied: int = 0


def export_run(run_dir: Path, out: Path, settings: ExportSettings, results_dir: Path | None = None) -> dict[str, Any]:
    """Write the run's masks (or those of ``results_dir``, a ``clusters/k<K>`` folder) to ``out``; returns ``export.json``."""
    settings.check()
    started = time.perf_counter()
    run = Run(Path(run_dir))
    if not run.is_datus_run():
        raise ConfigurationError(f"{run.root} is not a datus run folder (no {RUN_FILE} written by datus); give the --output_dir of datus predict")
    results = _results_folder(run, results_dir)
    classes = _read_classes(results)
    num_clusters = int(classes["num_clusters"])
    if settings.ignore_noise and settings.ignore_value < num_clusters:
        raise ConfigurationError(
            f"--ignore_value {settings.ignore_value} is a cluster id (K = {num_clusters}); give one of {num_clusters}..65535"
        )
    if settings.ignore_noise and settings.ignore_value > 255 and num_clusters <= 255:
        log.info("--ignore_value %d > 255: masks become 16-bit PNGs", settings.ignore_value)
    out = Path(out).expanduser().absolute()
    _claim_output(out, settings.format, run.root)
    try:
        image_root = image_root_of(results.root)
    except ValueError as error:
        raise ConfigurationError(str(error)) from None

    split = Split.of(_ids(results), settings.val_fraction, settings.seed)
    counts = Counts()
    writer = _writer(settings, out, counts)
    entries_written = [EXPORT_FILE, CARD_FILE, ID2LABEL_FILE, *writer.entries]
    # record what this export may own before writing, so a killed export can be replaced by the next
    write_json(out / EXPORT_FILE, {"datus_export": __version__, "format": settings.format, "complete": False, "entries": entries_written})
    with writer:
        for sample in _samples(run, results, image_root, split, settings, counts):
            writer.add(sample)
            counts.images[sample.split] += 1
    id2label = {str(index): name for index, name in enumerate(classes["classes"])}
    write_json(out / ID2LABEL_FILE, id2label)
    report: dict[str, Any] = {
        "datus_export": __version__,
        "format": settings.format,
        "complete": True,
        "entries": entries_written + [name for name in writer.files if "/" not in name and name not in entries_written],
        "out": str(out),
        "run": str(run.root.absolute()),
        "results": str(results.root.absolute()),
        "image_root": str(image_root) if image_root else None,
        "settings": {
            "val_fraction": settings.val_fraction, "seed": settings.seed, "ignore_noise": settings.ignore_noise,
            "ignore_value": settings.ignore_value if settings.ignore_noise else None, "shard_size": writer.shard_size,
            "link": settings.link if settings.format == "folders" else None,
        },  # fmt: skip
        "num_clusters": num_clusters,
        "images": counts.images,
        "noise_pixels_ignored": counts.noise_pixels if settings.ignore_noise else None,
        "files": writer.files,
        "image_suffixes": dict(sorted(writer.suffixes.items())),
        "linked": counts.linked if settings.format == "folders" else None,
        "copied": counts.copied if settings.format == "folders" else None,
        "seconds": round(time.perf_counter() - started, 3),
        "skipped": counts.skipped,
    }
    write_text(out / CARD_FILE, dataset_card(run, results, settings, report, id2label, writer))
    write_json(out / EXPORT_FILE, report)
    return report


def _results_folder(run: Run, results_dir: Path | None) -> Results:
    if results_dir is None:
        return run.results
    folder = Path(results_dir).expanduser()
    for candidate in run.all_results():
        if candidate.root.absolute() == folder.absolute() or (folder.exists() and candidate.root.resolve() == folder.resolve()):
            return candidate
    raise ConfigurationError(
        f"--results {folder} is neither the run folder {run.root} nor one of its clusters/k<K> folders; give "
        f"{run.root} or {run.root}/clusters/k<K>"
    )


def _read_classes(results: Results) -> dict[str, Any]:
    path = results.file(CLASSES_FILE)
    try:
        classes = read_json(path) if path.is_file() else None
    except UnreadableFile as error:
        raise ConfigurationError(str(error)) from None
    if not isinstance(classes, dict) or not isinstance(classes.get("num_clusters"), int) or not isinstance(classes.get("classes"), list):
        raise ConfigurationError(f"{path} is missing or not a run's classes file: {results.root} is not a finished datus run")
    if not results.file(MANIFEST_FILE).is_file():
        raise ConfigurationError(f"{results.file(MANIFEST_FILE)} is missing: {results.root} is not a finished datus run")
    return classes


def _claim_output(out: Path, format: str, run_root: Path) -> None:
    """OUT must be new, empty, or an earlier datus export of the same format (whose files are then removed)."""
    for folder in [out, *out.parents]:
        if folder.is_symlink():
            if folder == out:
                raise ConfigurationError(f"OUT {out} is a symbolic link; datus would write through it. Give a real folder")
            break
        if folder.exists() and not folder.is_dir():
            raise ConfigurationError(f"OUT {out}: {folder} is a file; give a folder (it is created if missing)")
    resolved, run_resolved = out.resolve(), run_root.resolve()
    if resolved.is_relative_to(run_resolved) or run_resolved.is_relative_to(resolved):
        raise ConfigurationError(f"OUT {out} lies inside the run {run_root} (or holds it); give a folder outside the run")
    if not out.is_dir():
        out.mkdir(parents=True)
        return
    entries = sorted(entry.name for entry in out.iterdir())
    if not entries:
        return
    marker = out / EXPORT_FILE
    recorded = None
    if marker.is_file() and not marker.is_symlink():
        try:
            recorded = read_json(marker)
        except UnreadableFile:
            recorded = None
    if not isinstance(recorded, dict) or "datus_export" not in recorded or not isinstance(recorded.get("entries"), list):
        raise ConfigurationError(
            f"OUT {out} is not empty and is not a datus export (no {EXPORT_FILE}); datus would mix with or overwrite "
            "your files. Give a new or empty folder"
        )
    if recorded.get("format") != format:
        raise ConfigurationError(
            f"OUT {out} holds a datus export of format {recorded.get('format')!r}, not {format!r}; give another folder"
        )
    pattern = OWNED_NAMES.get(format)
    owned = {str(name) for name in recorded["entries"]} & (OWNED_FILES | set(OWNED_FOLDERS))  # a forged list owns nothing more
    foreign = [
        name for name in entries
        if name not in owned and not TEMPORARY_NAME.fullmatch(name) and not (pattern and pattern.fullmatch(name))
    ]  # fmt: skip
    for folder in (name for name in entries if name in OWNED_FOLDERS and name in owned):
        path = out / folder
        if path.is_dir() and not path.is_symlink():
            foreign += [
                f"{folder}/{inner.name}" for inner in path.iterdir()
                if inner.is_dir() or inner.is_symlink() and not inner.is_file()
                or not (OWNED_FOLDERS[folder].fullmatch(inner.name) or TEMPORARY_NAME.fullmatch(inner.name))
            ]  # fmt: skip
    if foreign:
        raise ConfigurationError(
            f"OUT {out} holds {foreign[0]!r}, which the earlier datus export did not write; remove it or give a new folder"
        )
    for name in entries:  # only names the earlier export recorded (or its temporaries), never through a link
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    log.info("replacing the earlier %s export in %s", format, out)


def _ids(results: Results) -> Iterator[str]:
    """Every id of the manifest, streamed (damaged lines are skipped here and reported by the writing pass)."""
    for _, line in manifest_lines(results.root):
        try:
            image_id = json.loads(line)["image_id"]
        except (ValueError, KeyError, TypeError, RecursionError):
            continue
        if isinstance(image_id, str):
            yield image_id


def _read_bytes(path: Path) -> bytes:
    with open_regular(path) as stream:
        return stream.read()


def _samples(
    run: Run, results: Results, image_root: Path | None, split: Split, settings: ExportSettings, counts: Counts
) -> Iterator[Sample]:
    """The manifest's images, each checked (image decodes, mask is a label map of its size); skips are counted."""
    source = results.file(MANIFEST_FILE)
    seen: set[int] = set()  # 8 bytes an image: a line repeated in the (untrusted) manifest is exported once
    for number, line in manifest_lines(results.root):
        try:
            entry = read_entry(line, results.root, image_root, f"{source}, line {number}")  # type: ignore[arg-type]
        except ValueError as error:
            _skip(counts, f"line {number}", str(error))
            continue
        key = id_digest(entry.image_id)
        if key in seen:
            _skip(counts, f"line {number}", f"{entry.image_id!r} is listed again in {source}")
            continue
        seen.add(key)
        try:
            yield _sample(run, results, entry, split, settings, counts)
        except (OSError, UnreadableFile, *DECODE_ERRORS) as error:
            reason = f"{type(error).__name__}: {error}" if isinstance(error, OSError) and not isinstance(error, UnreadableFile) else str(error)
            _skip(counts, entry.image_id, reason if reason else decode_reason(error))


def _skip(counts: Counts, what: str, reason: str) -> None:
    log.warning("export: skipped %s: %s", what, reason)
    counts.skipped.append({"image": what, "reason": reason})


def _sample(run: Run, results: Results, entry: ManifestEntry, split: Split, settings: ExportSettings, counts: Counts) -> Sample:
    image_bytes = _read_bytes(entry.image)
    try:
        with Image.open(io.BytesIO(image_bytes)) as image:
            check_pixels(*image.size)
            image.load()
            orientation = image.getexif().get(0x0112, 1)
            size = image.size[::-1] if orientation in (5, 6, 7, 8) else image.size
    except DECODE_ERRORS as error:
        raise UnreadableFile(f"image {entry.image} cannot be decoded ({decode_reason(error)})") from None
    mask_path = results.image_file("masks", entry.image_id)
    mask = read_label_png(mask_path)
    if mask.shape != (size[1], size[0]):
        raise UnreadableFile(f"{mask_path} is {mask.shape[1]}x{mask.shape[0]} but its image is {size[0]}x{size[1]}")
    changed = False
    if settings.ignore_noise:
        segments = read_label_png(run.results.image_file(SEGMENTS, entry.image_id))
        if segments.shape != mask.shape:
            raise UnreadableFile(f"the segment map of {entry.image_id} is not the size of its mask")
        noise = segments == 0
        if noise.any():
            dtype = np.uint16 if settings.ignore_value > 255 or mask.dtype != np.uint8 else np.uint8
            mask = mask.astype(dtype)
            mask[noise] = settings.ignore_value
            counts.noise_pixels += int(noise.sum())
            changed = True
    if changed:
        mask_png = _png(mask)
    else:
        mask_png = _read_bytes(mask_path)
    suffix = entry.image.suffix.lower().lstrip(".") or "jpg"
    return Sample(entry, split.name(entry.image_id), image_bytes, suffix, mask_png, (size[0], size[1]), changed, mask_path)


def _png(labels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(labels).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


class _Writer:
    """One format's files in OUT; a context manager (files are renamed into place when complete)."""

    entries: tuple[str, ...] = ()

    def __init__(self, out: Path, settings: ExportSettings, counts: Counts) -> None:
        self.out = out
        self.settings = settings
        self.counts = counts
        self.shard_size = settings.shard_size or DEFAULT_SHARD_BYTES.get(settings.format)
        self.files: list[str] = []
        self.suffixes: dict[str, int] = {}
        self._stack = ExitStack()

    def __enter__(self) -> _Writer:
        return self

    def __exit__(self, *exc: Any) -> None:
        if exc[0] is None:
            self.close()
            self._stack.close()
        else:  # killed or failed: no file is renamed into place, and the ones already committed go
            self.abort(exc)

    def abort(self, exc: tuple[Any, ...]) -> None:
        """Leave nothing that a reader could take for a complete export (``export.json`` says it is not)."""
        self._stack.__exit__(*exc)

    def add(self, sample: Sample) -> None:
        self.suffixes[sample.suffix] = self.suffixes.get(sample.suffix, 0) + 1
        self.write(sample)

    def write(self, sample: Sample) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class _ShardedWriter(_Writer):
    """Files per split numbered from 0, a new one once ``shard_size`` bytes are written."""

    def __init__(self, out: Path, settings: ExportSettings, counts: Counts) -> None:
        super().__init__(out, settings, counts)
        self._open: dict[str, tuple[Any, ExitStack, int, int]] = {}  # split -> (handle, its stack, number, bytes)
        self._numbers: dict[str, int] = {}

    def _handle(self, split: str, size: int) -> Any:
        current = self._open.get(split)
        if current is not None and current[3] > 0 and current[3] + size > self.shard_size:  # type: ignore[operator]
            self._finish(split)
            current = None
        if current is None:
            number = self._numbers.get(split, 0)
            self._numbers[split] = number + 1
            stack = ExitStack()
            name = self.shard_name(split, number)
            temporary = stack.enter_context(atomic_path(self.out / name))
            handle = self.open_shard(temporary)
            self.files.append(name)
            current = (handle, stack, number, 0)
        handle, stack, number, written = current
        self._open[split] = (handle, stack, number, written + size)
        return handle

    def _finish(self, split: str) -> None:
        handle, stack, _, _ = self._open.pop(split)
        self.close_shard(handle)
        stack.close()  # renames the temporary into place

    def close(self) -> None:
        for split in list(self._open):
            self._finish(split)

    def abort(self, exc: tuple[Any, ...]) -> None:
        for split in list(self._open):
            handle, stack, _, _ = self._open.pop(split)
            with suppress(Exception):
                self.close_shard(handle)
            stack.__exit__(*exc)  # the temporary is deleted, not renamed
        for name in self.files:
            path = self.out / name
            if path.is_file() and not path.is_symlink():
                path.unlink()
        super().abort(exc)

    def shard_name(self, split: str, number: int) -> str:
        raise NotImplementedError

    def open_shard(self, path: Path) -> Any:
        raise NotImplementedError

    def close_shard(self, handle: Any) -> None:
        raise NotImplementedError


class _ParquetWriter(_ShardedWriter):
    entries = ("data",)

    def __init__(self, out: Path, settings: ExportSettings, counts: Counts) -> None:
        super().__init__(out, settings, counts)
        try:
            import pyarrow as pa
        except ImportError:
            raise ConfigurationError("--format hf writes Parquet with pyarrow: pip install 'datus[export]' (or pyarrow)") from None

        self.pa = pa
        image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
        metadata = {"huggingface": json.dumps({"info": {"features": HF_FEATURES}})}
        self.schema = pa.schema([("image", image), ("label", image), ("image_id", pa.string())], metadata=metadata)
        self._rows: dict[str, list[dict[str, Any]]] = {}
        self._row_bytes: dict[str, int] = {}
        (out / "data").mkdir(exist_ok=True)

    def shard_name(self, split: str, number: int) -> str:
        return f"data/{SPLIT_NAMES['hf'][split]}-{number:05d}.parquet"

    def open_shard(self, path: Path) -> Any:
        import pyarrow.parquet as pq

        return pq.ParquetWriter(
            str(path), self.schema, compression="none", use_dictionary=["image_id"], write_statistics=["image_id"]
        )  # image bytes: no dictionary, and no min/max statistics (the footer would hold two images per row group)

    def close_shard(self, handle: Any) -> None:
        handle.close()

    def write(self, sample: Sample) -> None:
        name = f"{encode_key(sample.entry.image_id)}.{sample.suffix}"
        row = {
            "image": {"bytes": sample.image_bytes, "path": name},
            "label": {"bytes": sample.mask_png, "path": f"{encode_key(sample.entry.image_id)}.png"},
            "image_id": sample.entry.image_id,
        }
        size = len(sample.image_bytes) + len(sample.mask_png)
        rows = self._rows.setdefault(sample.split, [])
        if rows and (len(rows) >= ROW_GROUP_ROWS or self._row_bytes[sample.split] + size > min(ROW_GROUP_BYTES, self.shard_size)):
            self._flush(sample.split)
        self._rows.setdefault(sample.split, []).append(row)
        self._row_bytes[sample.split] = self._row_bytes.get(sample.split, 0) + size

    def _flush(self, split: str) -> None:
        rows = self._rows.pop(split, [])
        size = self._row_bytes.pop(split, 0)
        if rows:
            handle = self._handle(split, size)
            handle.write_table(self.pa.Table.from_pylist(rows, schema=self.schema))

    def close(self) -> None:
        for split in list(self._rows):
            self._flush(split)
        super().close()


class _TarWriter(_ShardedWriter):
    entries = ()

    def shard_name(self, split: str, number: int) -> str:
        return f"{SPLIT_NAMES['webdataset'][split]}-{number:06d}.tar"

    def open_shard(self, path: Path) -> Any:
        return tarfile.open(path, "w", format=tarfile.PAX_FORMAT)

    def close_shard(self, handle: Any) -> None:
        handle.close()

    def write(self, sample: Sample) -> None:
        key = encode_key(sample.entry.image_id)
        meta = json_text(
            {"image_id": sample.entry.image_id, "image": sample.entry.image_path, "width": sample.size[0], "height": sample.size[1]},
            indent=None,
        ).encode("utf-8")
        members = [(f"{key}.{sample.suffix}", sample.image_bytes), (f"{key}.seg.png", sample.mask_png), (f"{key}.json", meta)]
        handle = self._handle(sample.split, sum(len(data) + 1536 for _, data in members))
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o644
            handle.addfile(info, io.BytesIO(data))
        handle.members.clear()  # TarFile lists every member it wrote: memory would grow with the images

    @property
    def patterns(self) -> dict[str, str]:
        found = {}
        for split in ("train", "val"):
            prefix = SPLIT_NAMES["webdataset"][split]
            count = sum(1 for name in self.files if name.startswith(prefix + "-"))
            if count:
                found[split] = f"{prefix}-{{000000..{count - 1:06d}}}.tar"
        return found


class _FolderWriter(_Writer):
    entries = ("images", "masks", "splits", "index.jsonl")

    def __init__(self, out: Path, settings: ExportSettings, counts: Counts) -> None:
        super().__init__(out, settings, counts)
        for folder in ("images", "masks", "splits"):
            (out / folder).mkdir(exist_ok=True)
        self._lists = {split: self._open_list(out / "splits" / f"{split}.txt") for split in ("train", "val")}
        self._index = self._open_list(out / "index.jsonl")
        self.files = ["images/", "masks/", "splits/train.txt", "splits/val.txt", "index.jsonl"]

    def abort(self, exc: tuple[Any, ...]) -> None:
        super().abort(exc)
        for folder in ("images", "masks"):  # created by this export (the claim left no foreign file there)
            for path in (self.out / folder).iterdir():
                if OWNED_FOLDERS[folder].fullmatch(path.name) and path.is_file() and not path.is_symlink():
                    path.unlink()

    def _open_list(self, path: Path) -> Any:
        temporary = self._stack.enter_context(atomic_path(path))
        return self._stack.enter_context(open(temporary, "w", encoding="utf-8", errors="surrogateescape"))

    def write(self, sample: Sample) -> None:
        stem = file_stem(sample.entry.image_id)
        self._place(sample.entry.image, sample.image_bytes, self.out / "images" / f"{stem}.{sample.suffix}")
        self._place(None if sample.mask_changed else sample.mask_path, sample.mask_png, self.out / "masks" / f"{stem}.png")
        self._lists[sample.split].write(stem + "\n")
        self._index.write(
            json_text({"name": stem, "image_id": sample.entry.image_id, "image": f"images/{stem}.{sample.suffix}",
                       "mask": f"masks/{stem}.png", "split": sample.split}, indent=None) + "\n"
        )  # fmt: skip

    def _place(self, source: Path | None, data: bytes, destination: Path) -> None:
        """A hard link to ``source`` (a regular file, the bytes just checked) where allowed, else a copy of ``data``."""
        if destination.exists() or destination.is_symlink():
            raise UnreadableFile(f"{destination.name} is written twice (two ids with one name)")
        if source is not None and self.settings.link == "hard":
            try:
                status = os.lstat(source)
                if os.path.isfile(source) and not os.path.islink(source) and status.st_size == len(data):
                    os.link(source, destination, follow_symlinks=False)
                    self.counts.linked += 1
                    return
            except OSError as error:  # ENOTDIR: a member of a tar shard, which has no file of its own to link
                if error.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.EACCES, errno.ENOTSUP, errno.EOPNOTSUPP,
                                       errno.ENOTDIR):  # fmt: skip
                    raise
        with atomic_path(destination) as temporary:
            temporary.write_bytes(data)
        self.counts.copied += 1


def _writer(settings: ExportSettings, out: Path, counts: Counts) -> _Writer:
    if settings.format == "hf":
        return _ParquetWriter(out, settings, counts)
    if settings.format == "webdataset":
        return _TarWriter(out, settings, counts)
    return _FolderWriter(out, settings, counts)


def _run_facts(run: Run, results: Results) -> dict[str, Any]:
    """What produced the masks: run.json's model, config.yaml's cluster settings, summary and metrics."""
    facts: dict[str, Any] = {}
    for name, path in (("run", run.file(RUN_FILE)), ("summary", results.file(SUMMARY_FILE)), ("metrics", results.file(METRICS_FILE))):
        try:
            facts[name] = read_json(path) if path.is_file() else None
        except UnreadableFile:
            facts[name] = None
    config = run.file(CONFIG_FILE)
    try:
        facts["config"] = _read_bytes(config).decode("utf-8", "replace") if config.is_file() else None
    except OSError:
        facts["config"] = None
    return facts


def dataset_card(run: Run, results: Results, settings: ExportSettings, report: dict[str, Any], id2label: dict[str, str], writer: _Writer) -> str:
    """``README.md`` of the export: how to load it, what produced it, how good it looks."""
    facts = _run_facts(run, results)
    model = ((facts["run"] or {}).get("identity") or {}).get("model") or {}
    summary = facts["summary"] or {}
    metrics = facts["metrics"]
    lines: list[str] = []
    if settings.format == "hf":
        lines += ["---", "configs:", "- config_name: default", "  data_files:"]
        for split, name in SPLIT_NAMES["hf"].items():
            if report["images"][split]:
                lines += [f"  - split: {name}", f"    path: data/{name}-*.parquet"]
        lines += ["dataset_info:", "  features:", "  - name: image", "    dtype: image", "  - name: label", "    dtype: image",
                  "  - name: image_id", "    dtype: string", "task_categories:", "- image-segmentation", "---", ""]  # fmt: skip
    ignore = settings.ignore_value if settings.ignore_noise else None
    lines += [
        f"# Pseudo masks of {run.root.name} ({settings.format})",
        "",
        f"Unsupervised pseudo masks from `datus` {__version__} (DatUS: a frozen self-supervised ViT, no labels). "
        f"{report['num_clusters']} pseudo classes (`{ID2LABEL_FILE}`); images: {report['images']['train']} train, "
        f"{report['images']['val']} validation (seeded per-id split: val_fraction {settings.val_fraction}, seed {settings.seed}); "
        f"{len(report['skipped'])} skipped (listed in `{EXPORT_FILE}`).",
        "",
        "Masks: one cluster id per pixel, at the image's size (EXIF orientation applied). Ignore value: "
        + (f"{ignore} (noise segments of the run, {report['noise_pixels_ignored']} pixels)." if ignore is not None else "none (every pixel has a class)."),
        "",
        "## Loading",
        "",
        "```python",
        *(line.replace("OUT", report["out"]) for line in _loading_lines(settings.format, writer, ignore)),
        "```",
        "",
        "## How the masks were made",
        "",
        f"- run: `{run.root.absolute()}`; masks from `{results.root.absolute()}`",
        f"- backbone: {model.get('backbone', '?')}, patch size {model.get('patch_size', '?')}, weights {model.get('weights', '?')}, "
        f"embedding {model.get('embedding', '?')}",
        f"- K = {report['num_clusters']}",
    ]
    verdict = summary.get("verdict")
    if isinstance(verdict, dict):
        lines.append(f"- verdict: {verdict.get('status', '?')} {json.dumps(verdict.get('reasons', ''))}")
    diagnostics = summary.get("diagnostics")
    if isinstance(diagnostics, dict):
        lines += ["", "Diagnostics (label-free, from summary.json):", "", "```json", json.dumps(diagnostics, indent=1)[:4000], "```"]
    if isinstance(metrics, dict):
        protocols = metrics.get("protocols") or {}
        lines += ["", "Scores against ground truth (metrics.json):", ""]
        for name, protocol in protocols.items():
            if isinstance(protocol, dict):
                values = ", ".join(f"{key} {protocol[key]:.4f}" for key in ("miou", "pixel_accuracy", "nmi", "ari") if isinstance(protocol.get(key), (int, float)))
                lines.append(f"- {name}: {values}")
    else:
        lines += ["", "Not scored (no ground truth): the class names are `cluster <i>`."]
    if facts["config"]:
        lines += ["", "Settings (config.yaml of the run):", "", "```yaml", facts["config"][:8000].rstrip(), "```"]
    return "\n".join(lines) + "\n"


def _loading_lines(format: str, writer: _Writer, ignore: int | None) -> list[str]:
    if format == "hf":
        return [
            "from datasets import load_dataset",
            'data = load_dataset("parquet", data_dir="OUT")  # splits train, validation; image and label are PIL images',
            'id2label = {int(k): v for k, v in json.load(open("OUT/id2label.json")).items()}',
        ]
    if format == "webdataset":
        patterns = writer.patterns if isinstance(writer, _TarWriter) else {}
        train = patterns.get("train", "train-000000.tar")
        return [
            "import webdataset as wds",
            f'train = wds.WebDataset("OUT/{train}", shardshuffle=100).decode("pil").to_tuple("jpg;jpeg;png;webp;bmp;tif;tiff", "seg.png", "json")',
            "# image ids: urllib.parse.unquote(sample['__key__']) (keys are percent-encoded ids, no dots)",
        ]
    ignore_text = ignore if ignore is not None else 255
    suffix = max(writer.suffixes, key=writer.suffixes.get) if writer.suffixes else "jpg"  # type: ignore[arg-type]
    mixed = f" (the run mixes {', '.join(sorted(writer.suffixes))}: mmseg and detectron2 take one)" if len(writer.suffixes) > 1 else ""
    return [
        f"# mmsegmentation (1.x): flat folders, stems equal, one img_suffix for all images{mixed}",
        f"train_dataloader = dict(dataset=dict(type='BaseSegDataset', data_root='OUT', data_prefix=dict(img_path='images', seg_map_path='masks'), img_suffix='.{suffix}', seg_map_suffix='.png', ann_file='splits/train.txt', metainfo=dict(classes=CLASSES), ignore_index={ignore_text}))",
        f"# detectron2: load_sem_seg(gt_root='OUT/masks', image_root='OUT/images', gt_ext='png', image_ext='{suffix}') (every file: it lists no split)",
    ]
