"""The run folder: the one owner of its layout, identity, finished images, output paths and lock.

Every path datus writes below ``--output_dir`` is spelled in this module and nowhere else, and
every path built from data (an image id read from a shard, a manifest or a folder listing) is
checked here to stay inside the folder. A run folder is a dataset too (``manifest.jsonl`` and
``classes.json``), so its layout is a public contract; ``ARCHITECTURE.md`` describes it.

What the folder guarantees:

- ``run.json`` records what the records were made from (model settings and input data); a
  rerun with other settings is refused instead of mixing two runs.
- A folder that is not empty and holds no ``run.json`` is not datus's: it is refused, so datus
  never overwrites, or deletes, files it did not write.
- Temporaries of killed runs are removed only when they match datus's own temporary name
  exactly and lie in the folders datus writes.
- One process at a time: ``run.lock`` is held with ``flock``, which the kernel releases when a
  process dies, so a crashed run never leaves the folder locked.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from datus import __version__
from datus.core.errors import ConfigurationError
from datus.core.files import RUN_MARKER
from datus.core.io import TEMPORARY_NAME, UnreadableFile, read_json, write_json

RUN_FILE = RUN_MARKER
LOCK_FILE = "run.lock"
CONFIG_FILE = "config.yaml"
SHARDS_DIR = "shards"
LOGS_DIR = "logs"
CLUSTERS_DIR = "clusters"
FIT_DIR = "fit"
"""In every results folder: the cluster model its masks were painted with, and what it was fitted on."""
CACHE_DIR = "cache"
"""Segment tables that stage 6 memory-maps (:func:`datus.runfolder.shards.segment_table`); derived from shards/, safe to delete."""
SKIPPED_FILE = "skipped.json"

MASKS = "masks"
SEGMENTS = "segments"
COLOUR = "color"
OVERLAY = "overlay"
IMAGE_FOLDERS = {MASKS: ".png", SEGMENTS: ".png", COLOUR: ".png", OVERLAY: ".jpg"}
"""Folders with one file per image, named by image id, and that file's suffix (overlays are photographs)."""

METRICS_FILE = "metrics.json"
METRICS_TABLE = "metrics.txt"
CONFUSION_FILE = "confusion.png"
SUMMARY_FILE = "summary.json"
SWEEP_TABLE = "summary.txt"
"""``clusters/summary.txt``: the sweep table as printed (``clusters/summary.json`` holds its rows and the suggested K)."""
REPORT_FILE = "report.png"
LEGEND_FILE = "legend.png"
MANIFEST_FILE = "manifest.jsonl"
DATASET_FILE = "dataset.json"
"""Beside the manifest: the input root its image paths are relative to (:mod:`datus.outputs.manifest`)."""
CLASSES_FILE = "classes.json"
"""Class names and ids, beside a prepared dataset and in every results folder (runs are datasets too)."""
PAINTED_FILE = "painted.json"
GALLERY_DIR = "gallery"
GALLERY_INDEX = "index.png"
"""The overview of every cluster's galleries, in ``GALLERY_DIR``."""
_GALLERY_SHEET = re.compile(r"cluster_(\d+)\.png")
HTML_INDEX = "index.html"
"""The page to browse a results folder in a browser (:mod:`datus.outputs.html_view`); its image pages are in ``VIEW_DIR``."""
VIEW_DIR = "view"
_VIEW_PAGE = re.compile(r"page-(\d{6,})\.html")

_SHARD_NAME = re.compile(r"rank(\d{3})-(\d{7})\.npz")
_UNSAFE_CHARACTERS = re.compile(r"[\x00-\x1f\x7f\\:*?\"<>|\ud800-\udfff]")
_MAX_NAME_BYTES = 200
"""Longest id component in bytes: with ``.png`` and a suffix it stays under the 255 of any file system."""

_CUT_NAME_BYTES = 180
"""Where a long name is cut, leaving room for the suffixes that make ids unique (``_jpg``, ``_2``)."""

_MAX_ID_BYTES = 1024
"""Longest whole id: an output path (run folder, ``clusters/k<K>/overlay/``, id, suffix) then stays far
below the 4096 bytes of PATH_MAX however deep the input tree is."""

NOT_WRITABLE = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})
"""Errors of a folder the user may not write: read-only mounts, permissions."""
OUT_OF_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})

_OUTPUT_SUFFIX = re.compile(r"\.(png|jpg)$", re.IGNORECASE)
"""A folder named like an output file (``a.png/``) would collide with the output of ``a.jpg``."""


def image_id_for(relative_path: Path) -> str:
    """A stable id that is a safe relative file name: the relative path without its extension.

    Folders are kept, so outputs mirror the input tree. Characters that are illegal on common
    file systems, control characters and undecodable bytes become ``_``; a component longer
    than :data:`_CUT_NAME_BYTES` bytes is cut and given a hash of its full name, so that any
    legal input name maps to an output name every file system accepts; an id longer than
    :data:`_MAX_ID_BYTES` keeps its leading folders that fit and ends in a hash of the whole path; a folder named like an
    output file (``x.png``) gets a trailing ``_``. The manifest keeps the original path.
    """
    parts = []
    components = relative_path.with_suffix("").parts
    for index, part in enumerate(components):
        safe = _UNSAFE_CHARACTERS.sub("_", part)
        if safe in ("", ".", ".."):
            safe = "_"
        if index < len(components) - 1 and _OUTPUT_SUFFIX.search(safe):
            safe += "_"
        if len(safe.encode("utf-8")) > _CUT_NAME_BYTES:
            digest = hashlib.sha1(part.encode("utf-8", "surrogateescape")).hexdigest()[:10]
            safe = safe.encode("utf-8")[: _CUT_NAME_BYTES - 11].decode("utf-8", "ignore") + "~" + digest
        parts.append(safe)
    if len("/".join(parts).encode("utf-8")) > _MAX_ID_BYTES:  # a deep tree: keep the leading folders that fit
        digest = hashlib.sha1(str(relative_path).encode("utf-8", "surrogateescape")).hexdigest()[:10]
        last = parts[-1].encode("utf-8")[: _CUT_NAME_BYTES - 11].decode("utf-8", "ignore") + "~" + digest
        kept: list[str] = []
        for part in parts[:-1]:
            if len("/".join([*kept, part, last]).encode("utf-8")) > _MAX_ID_BYTES:
                break
            kept.append(part)
        parts = [*kept, last]
    return "/".join(parts)


def check_image_id(image_id: str, source: Path | str) -> str:
    """Refuse an id read from a file unless it is a relative path that stays in its folder.

    Run files are untrusted input: an id like ``../../x`` or ``/etc/x`` would make datus write
    outside the run folder.
    """
    parts = image_id.split("/")
    bad = (
        not image_id
        or image_id.startswith("/")
        or any(part in ("", ".", "..") for part in parts)
        or _UNSAFE_CHARACTERS.search(image_id) is not None
        or any(len(part.encode("utf-8")) > _MAX_NAME_BYTES for part in parts)
        or len(image_id.encode("utf-8")) > _MAX_ID_BYTES + _MAX_NAME_BYTES - _CUT_NAME_BYTES
    )
    if bad:
        raise ConfigurationError(
            f"{source} holds the image id {image_id[:120]!r}, which is not a safe relative name; the file was "
            "not written by datus or is damaged. Delete it and run again."
        )
    return image_id


def view_page_name(number: int) -> str:
    """File name of image page ``number`` (from 1) of the HTML view, matched by the page pattern."""
    return f"page-{number:06d}.html"


def fit_folder(source: Path) -> Path:
    """The ``fit/`` folder named by ``--cluster.centroids``: given itself, or the results folder holding it."""
    return source if source.name == FIT_DIR else source / FIT_DIR


@dataclass(frozen=True)
class Results:
    """A folder of painted outputs: the run folder itself, or ``clusters/k<K>/`` for ``datus cluster``.

    Attributes:
        root: the folder.
        boundary: the run folder every output must resolve inside (``root`` when not given).
    """

    root: Path
    boundary: Path | None = None

    def image_file(self, folder: str, image_id: str) -> Path:
        """``root/<folder>/<id>.png`` (``.jpg`` for overlays) for a checked id, refused if it resolves outside the run."""
        if folder not in IMAGE_FOLDERS:
            raise ValueError(f"unknown image folder {folder!r}")
        path = self.root / folder / f"{image_id}{IMAGE_FOLDERS[folder]}"
        boundary = (self.boundary or self.root).resolve()
        if not path.resolve().is_relative_to(boundary):
            raise ConfigurationError(
                f"{path} resolves outside {boundary} (a symbolic link in the run folder?); remove the link"
            )
        return path

    def file(self, name: str) -> Path:
        """A dataset-level file of these results (``metrics.json``, ``report.png``, ...)."""
        return self.root / name

    def gallery_sheet(self, cluster: int) -> Path:
        """``gallery/cluster_<k>.png``: the typical and random segments of one cluster."""
        return self.root / GALLERY_DIR / f"cluster_{cluster}.png"

    def gallery_index(self) -> Path:
        return self.root / GALLERY_DIR / GALLERY_INDEX

    @property
    def fit_dir(self) -> Path:
        """The fit painted into these results: kept beside them, so a folder's centroids always match its masks."""
        return self.root / FIT_DIR

    def view_page(self, number: int) -> Path:
        """``view/page-<n>.html`` (n from 1): one page of the images in manifest order."""
        return self.root / VIEW_DIR / view_page_name(number)

    def view_pages(self) -> dict[int, Path]:
        """The image pages present now, by number (to remove those of a longer earlier run)."""
        folder = self.root / VIEW_DIR
        if not folder.is_dir() or folder.is_symlink():
            return {}
        return {int(match[1]): path for path in folder.iterdir() if (match := _VIEW_PAGE.fullmatch(path.name))}

    @property
    def is_run_folder(self) -> bool:
        """Whether these are the run folder's own results (not ``clusters/k<K>/``)."""
        return self.boundary is None or self.boundary == self.root

    def gallery_sheets(self) -> dict[int, Path]:
        """The cluster sheets present now, by cluster id (to remove those of a larger earlier K)."""
        folder = self.root / GALLERY_DIR
        if not folder.is_dir():
            return {}
        return {int(match[1]): path for path in folder.iterdir() if (match := _GALLERY_SHEET.fullmatch(path.name))}


class Run:
    """The folder of one ``datus predict`` run (``--output_dir``)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).expanduser()
        self.results = Results(self.root, self.root)

    def __repr__(self) -> str:
        return f"Run({str(self.root)!r})"

    @property
    def shards_dir(self) -> Path:
        return self.root / SHARDS_DIR

    def file(self, name: str) -> Path:
        return self.root / name

    @property
    def cache_dir(self) -> Path:
        return self.root / CACHE_DIR

    def log_file(self, rank: int) -> Path:
        return self.root / LOGS_DIR / f"predict-rank{rank:03d}.json"

    def log_files(self) -> list[Path]:
        return sorted((self.root / LOGS_DIR).glob("predict-rank[0-9][0-9][0-9].json"))

    def remove_image_outputs(self, image_id: str) -> None:
        """Delete the per-image files datus painted for ``image_id``, in the run folder and every
        ``clusters/k<K>/`` (an image that vanished from the input must not keep a mask)."""
        for results in self.all_results():
            for folder in IMAGE_FOLDERS:
                path = results.image_file(folder, image_id)
                if path.is_file() and not path.is_symlink():
                    path.unlink()

    def sweep_file(self, name: str) -> Path:
        """``clusters/<name>``: the table of a ``datus cluster`` sweep over K."""
        return self.root / CLUSTERS_DIR / name

    def cluster_results(self, num_clusters: int) -> Results:
        """``clusters/k<K>/``: the results of ``datus cluster`` for K, with their own fit."""
        return Results(self.root / CLUSTERS_DIR / f"k{num_clusters}", self.root)

    def all_results(self) -> list[Results]:
        """The run folder's results and every ``clusters/k<K>/`` present."""
        clusters = self.root / CLUSTERS_DIR
        folders = [self.results]
        if clusters.is_dir() and not clusters.is_symlink():
            folders += [Results(entry, self.root) for entry in sorted(clusters.iterdir()) if re.fullmatch(r"k\d+", entry.name)]
        return folders

    def shard_path(self, rank: int, sequence: int) -> Path:
        return self.shards_dir / f"rank{rank:03d}-{sequence:07d}.npz"

    def shards(self) -> list[Path]:
        """All complete shards, in a stable order (rank, then sequence)."""
        if not self.shards_dir.is_dir():
            return []
        named = [(match, path) for path in self.shards_dir.iterdir() if (match := _SHARD_NAME.fullmatch(path.name))]
        return [path for _, path in sorted(named, key=lambda item: (int(item[0][1]), int(item[0][2])))]

    def next_sequence(self, rank: int) -> int:
        """First unused shard number of ``rank``: a resumed run appends, never overwrites."""
        numbers = [int(m[2]) for p in self.shards() if (m := _SHARD_NAME.fullmatch(p.name)) and int(m[1]) == rank]
        return max(numbers, default=-1) + 1

    def is_datus_run(self) -> bool:
        """Whether the folder holds a ``run.json`` that datus wrote."""
        path = self.root / RUN_FILE
        if not path.is_file():
            return False
        try:
            content = read_json(path)
        except UnreadableFile:
            return False
        return isinstance(content, dict) and "datus_version" in content

    def check_writable(self) -> None:
        """Refuse a folder that datus did not create, or one inside another run: it would mix with their files."""
        for folder in [self.root, *self.root.absolute().parents]:
            if folder.exists() and not folder.is_dir():
                raise ConfigurationError(f"--output_dir {self.root}: {folder} is a file; give a folder (it is created if missing)")
        for parent in self.root.absolute().parents:
            if Run(parent).is_datus_run():
                raise ConfigurationError(
                    f"--output_dir {self.root} lies inside the datus run {parent}; its files would mix with that run's. "
                    "Give a folder outside it"
                )
        self.check_links()
        if (self.root / RUN_FILE).is_file():
            self.recorded_identity()  # a damaged run file is named as such, not taken for a foreign folder
            return
        entries = [entry for entry in self.root.iterdir() if entry.name != LOCK_FILE] if self.root.is_dir() else []
        if entries:
            raise ConfigurationError(
                f"--output_dir {self.root} is not empty and is not a datus run folder (no {RUN_FILE}); datus "
                "writes masks/, segments/ and more there and would mix with or overwrite your files. Give a new "
                "or empty folder."
            )

    def check_links(self) -> None:
        """Refuse symbolic links where datus writes: through one, its files would land (or be deleted) elsewhere.

        Checked: the lock file and every folder datus writes or cleans (per-image folders are
        also checked file by file through :meth:`Results.image_file`).
        """
        candidates = [self.root, self.root / LOCK_FILE, self.root / SHARDS_DIR, self.root / LOGS_DIR, self.root / CLUSTERS_DIR]
        candidates.append(self.root / CACHE_DIR)
        for results in self.all_results():
            candidates += [results.root, *(results.root / name for name in (*IMAGE_FOLDERS, GALLERY_DIR, FIT_DIR, VIEW_DIR))]
        linked = [path for path in candidates if path.is_symlink()]
        if linked:
            raise ConfigurationError(
                f"{linked[0]} is a symbolic link; datus writes there and would write (or delete) through it. Remove "
                "the link (or give a new --output_dir)"
            )
        for path in candidates[1:]:
            if path.exists() and path.name != LOCK_FILE and not path.is_dir():
                raise ConfigurationError(f"{path} is a file where datus keeps a folder; remove it or give a new --output_dir")

    def recorded_identity(self) -> dict[str, Any] | None:
        """What ``run.json`` says the records were made from, or None for a new run."""
        if not (self.root / RUN_FILE).is_file():
            return None
        try:
            content = read_json(self.root / RUN_FILE)
        except UnreadableFile as error:
            raise ConfigurationError(f"{error}; or give a new --output_dir") from error
        identity = content.get("identity") if isinstance(content, dict) else None
        if (
            not isinstance(identity, dict)
            or not isinstance(identity.get("model"), dict)
            or not isinstance(identity.get("data"), (dict, type(None)))
        ):
            raise ConfigurationError(
                f"{self.root / RUN_FILE} is not a run file of this datus version; use a new --output_dir"
            )
        return content["identity"]

    def claim(self, identity: dict[str, Any], inputs: dict[str, Any] | None = None) -> None:
        """Start or resume the run: refuse other settings or data, then record ``identity``.

        Args:
            identity: ``{"model": ..., "data": ...}``; the data part may be None when the data
                module cannot describe itself (then only the model is compared).
            inputs: what the input was this time (the tar shards read), recorded beside the
                identity and not compared: changed input is handled record by record.
        """
        self.check_writable()
        recorded = self.recorded_identity()
        if recorded is not None:
            differences = []
            for part in ("model", "data"):
                old, new = recorded.get(part) or {}, identity.get(part) or {}
                for key in sorted(old.keys() | new.keys()):
                    if old.get(key) != new.get(key):
                        differences.append(f"{part} {key}: was {old.get(key)!r}, now {new.get(key)!r}")
            if differences:
                raise ConfigurationError(
                    f"--output_dir {self.root} holds a run made from other settings or data "
                    f"({'; '.join(differences)}). Resuming would mix them: use a new --output_dir, or delete the "
                    "old one to start over."
                )
        content: dict[str, Any] = {"datus_version": __version__, "identity": identity}
        if inputs:
            content["inputs"] = inputs
        write_json(self.root / RUN_FILE, content)

    def remove_temporaries(self) -> int:
        """Delete temporaries that a killed run left in this run's folders; returns how many.

        Only files whose name is exactly datus's temporary format are removed, only in the
        folders datus writes, and only when the folder is a datus run. Call it only while
        holding :meth:`lock`.
        """
        if not self.is_datus_run():
            return 0
        removed = 0
        for folder in self._written_folders():
            for path in folder.iterdir() if folder.is_dir() else ():
                if TEMPORARY_NAME.fullmatch(path.name) and path.is_file() and not path.is_symlink():
                    path.unlink(missing_ok=True)
                    removed += 1
        return removed

    def _written_folders(self) -> Iterator[Path]:
        yield self.root
        for name in (SHARDS_DIR, LOGS_DIR, CACHE_DIR):
            yield self.root / name
        trees = [self.root / name for name in (*IMAGE_FOLDERS, CLUSTERS_DIR, GALLERY_DIR, VIEW_DIR)]
        for tree in trees:
            if tree.is_dir() and not tree.is_symlink():
                for folder, subfolders, _ in os.walk(tree):
                    yield Path(folder)

    def acquire(self) -> None:
        """Hold the run folder for this process; another process is refused, not merged.

        Re-entrant within a process (the writer and the post-processing callback both hold it
        for one run): the lock is released when every :meth:`acquire` has been released.
        """
        key = self.root.resolve()
        if key in _HELD:
            stream, count = _HELD[key]
            _HELD[key] = (stream, count + 1)
            return
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self.check_links()
            descriptor = os.open(self.root / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as error:
            if error.errno in NOT_WRITABLE:
                raise ConfigurationError(
                    f"--output_dir {self.root} is not writable ({error.strerror}); make it writable or give another "
                    "--output_dir"
                ) from None
            raise ConfigurationError(f"{self.root / LOCK_FILE} cannot be opened ({error}); remove it") from None
        stream = os.fdopen(descriptor, "r+")
        try:
            fcntl.flock(stream, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            stream.seek(0)
            holder = stream.read().strip() or "another process"
            stream.close()
            raise ConfigurationError(
                f"--output_dir {self.root} is in use by {holder}; wait for it to finish or give another "
                "--output_dir (two runs in one folder would mix their files)"
            ) from None
        stream.seek(0)
        stream.truncate()
        stream.write(f"datus process {os.getpid()}")
        stream.flush()
        _HELD[key] = (stream, 1)

    def release(self) -> None:
        """Undo one :meth:`acquire`; harmless when this process does not hold the folder."""
        key = self.root.resolve()
        if key not in _HELD:
            return
        stream, count = _HELD.pop(key)
        if count > 1:
            _HELD[key] = (stream, count - 1)
            return
        fcntl.flock(stream, fcntl.LOCK_UN)
        stream.close()

    @contextmanager
    def lock(self) -> Iterator[None]:
        """:meth:`acquire` for the duration of a ``with`` block."""
        self.acquire()
        try:
            yield
        finally:
            self.release()


_HELD: dict[Path, tuple[IO[str], int]] = {}
"""Run folders this process holds, with their open lock file and how many holders share it."""
