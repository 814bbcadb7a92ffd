"""Tar shards (WebDataset layout) as input: list their members, read one member without extracting.

A WebDataset shard is an uncompressed tar in which the files of one sample share a key (the
member name without its extension): ``a/b.jpg`` and its ground truth ``a/b.seg.png``. datus
reads shards with the standard library's :mod:`tarfile`, only to index them: one pass over the
headers (512 bytes per member, the data is skipped) gives each member's name, type, size and
data offset. Members are then read by ``os.pread`` at their offset through one open handle per
tar and process (loader workers included), so a shard is never extracted, never reopened per
image, and each worker reads its members in increasing offset order. The offsets are what
``--data.root`` folders get from paths: a stable position for DDP splitting and a key for resume.

Paths: a member is named by the path *through* its tar, ``/data/train-0003.tar/a/b.jpg``. No
file system path can pass through a regular file, so the name is unambiguous, and
:func:`datus.core.io.open_regular` reads such a path from the tar (reports, galleries, overlays and
the CRF read images by path after prediction). Members that are not regular files, names that
leave the shard (``../x``, ``/etc/x``), sizes beyond the shard's end or above
:data:`MAX_MEMBER_BYTES` are refused when read, with the reason, like undecodable files.

Only the standard library is used: :mod:`tarfile` exposes each member's data offset, which the
``webdataset`` package's streaming reader does not, and the offsets are what a map-style
dataset needs for DDP splitting and resume.
"""

from __future__ import annotations

import hashlib
import io
import os
import posixpath
import re
import stat
import tarfile
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from datus.core.errors import ConfigurationError
from datus.core.files import IMAGE_EXTENSIONS, OUTPUT_MARKERS, NotRegularFile, UnreadableFile, open_regular_file

TAR_SUFFIX = ".tar"
MASK_SUFFIX = ".seg.png"
"""Ground truth inside a shard: ``<key>.seg.png`` beside ``<key>.jpg`` (WebDataset's field ``seg.png``)."""
MAX_PATTERN_NAMES = 1_000_000
"""Most shards one brace range may name (a typo such as {0..99999999} must not hang the listing)."""

MAX_MEMBER_BYTES = 1 << 30
"""Largest member datus reads from a tar (1 GiB): a member is read into memory whole."""

_BRACES = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")


@dataclass(frozen=True)
class Member:
    """One member of a tar: where its data is, or why it cannot be read."""

    tar: str
    """Absolute path of the shard."""
    name: str
    """Member name as in the tar, normalised (``./a.jpg`` -> ``a.jpg``)."""
    offset: int
    size: int
    refused: str = ""
    """Why the member is not read ('' when it is readable)."""

    @property
    def path(self) -> str:
        """The path through the tar that names this member (``/data/x.tar/a.jpg``)."""
        return f"{self.tar}/{self.name}"


@dataclass(frozen=True)
class ShardIndex:
    """Every member of one shard, in tar order, and the shard's own mark."""

    tar: str
    mtime_ns: int
    members: tuple[Member, ...]
    damaged: str = ""
    """Why the listing stopped before the end of the tar ('' when it did not)."""

    def by_name(self) -> dict[str, Member]:
        return {member.name: member for member in self.members}


def expand_braces(pattern: str) -> list[str]:
    """``train-{0000..0002}.tar`` -> the three names; ``{a,b}`` lists; ranges keep zero padding."""
    found = _BRACES.search(pattern)
    if found is None:
        return [pattern]
    body, head, tail = found.group(1), pattern[: found.start()], pattern[found.end() :]
    numbers = _RANGE.match(body)
    if numbers:
        low, high = int(numbers.group(1)), int(numbers.group(2))
        if abs(high - low) >= MAX_PATTERN_NAMES:
            raise ConfigurationError(f"--data.root {pattern}: the range {{{body}}} names more than {MAX_PATTERN_NAMES} shards")
        width = len(numbers.group(1)) if numbers.group(1).startswith("0") else 0
        step = 1 if high >= low else -1
        choices = [str(value).zfill(width) for value in range(low, high + step, step)]
    else:
        choices = body.split(",")
    return [name for choice in choices for name in expand_braces(head + choice + tail)]


def is_tar_source(root: Path | str) -> bool:
    """Whether ``--data.root`` names tar shards: a ``.tar`` file or pattern, or a folder with shards and no images.

    datus's own outputs below the folder (a run, an export: :data:`~datus.core.files.OUTPUT_MARKERS`)
    do not count. A folder holding image files is a folder of images, shards or not (the data
    module then says that its shards are not read).
    """
    text = str(root)
    if text.lower().endswith(TAR_SUFFIX) and not os.path.isdir(os.path.expanduser(text)) or "{" in text and _BRACES.search(text):
        return True
    folder = Path(text).expanduser()
    if not folder.is_dir():
        return False
    has_tar = False
    for here, files in _input_folders(folder):
        for name in files:
            suffix = Path(name).suffix.lower()
            if suffix in IMAGE_EXTENSIONS:
                return False
            has_tar = has_tar or suffix == TAR_SUFFIX and os.path.isfile(Path(here, name))
    return has_tar


def _input_folders(folder: Path) -> Iterator[tuple[str, list[str]]]:
    """(folder, file names) of ``folder``'s tree, linked folders followed once each, datus's own outputs left out."""
    seen: set[tuple[int, int]] = set()
    for here, subfolders, files in os.walk(folder, followlinks=True):
        status = os.stat(here)
        if (status.st_dev, status.st_ino) in seen or here != str(folder) and any(marker in files for marker in OUTPUT_MARKERS):
            subfolders.clear()
            continue
        seen.add((status.st_dev, status.st_ino))
        subfolders.sort()
        yield here, files


def list_shards(root: Path | str) -> tuple[Path, list[Path]]:
    """(base folder, shards) of a tar source; ids are the shards' paths below the base.

    The base is the folder itself for a folder (searched recursively), the tar's folder for one
    tar, and the folder before the first brace for a pattern: it depends only on what the user
    typed, so adding shards to a pattern or folder never renames the images of the others.
    """
    text = os.path.expanduser(str(root))
    if os.path.isdir(text):
        base = Path(text)
        shards = sorted(_shards_below(base))
    else:
        prefix = text[: text.index("{")] if "{" in text else text
        base = Path(os.path.dirname(prefix) or ".")
        shards = sorted({Path(name) for name in expand_braces(text)})
    return Path(os.path.abspath(base)), [Path(os.path.abspath(path)) for path in shards]


def _shards_below(folder: Path) -> Iterator[Path]:
    """The shards in ``folder``'s tree, outside datus's own outputs."""
    for here, files in _input_folders(folder):
        yield from (Path(here, name) for name in files if name.lower().endswith(TAR_SUFFIX) and os.path.isfile(Path(here, name)))


def shard_stem(shard: Path, base: Path) -> str:
    """The id prefix of a shard's images: its path below ``base`` without ``.tar``."""
    relative = shard.relative_to(base).as_posix() if shard.is_relative_to(base) else shard.name
    return relative[: -len(TAR_SUFFIX)] if relative.lower().endswith(TAR_SUFFIX) else relative


def _normalised(name: str) -> tuple[str, str]:
    """(normalised name, '' or why the name is refused)."""
    if name.startswith("/") or re.match(r"^[A-Za-z]:[\\/]", name):
        return name, f"member name {name!r} is absolute"
    clean = posixpath.normpath(name.replace("\\", "/"))
    if clean == ".." or clean.startswith("../") or "/../" in f"/{name.replace(chr(92), '/')}/":
        return name, f"member name {name!r} leaves the shard (..)"
    return clean, ""


def index_shard(tar: Path) -> ShardIndex:
    """Read the headers of ``tar`` (not the data) into a :class:`ShardIndex`.

    Raises:
        UnreadableFile: the shard cannot be opened or is not a tar at all.
    """
    tar_path = os.path.abspath(tar)
    try:
        stream = open_regular_file(Path(tar_path))
    except OSError as error:
        raise UnreadableFile(f"cannot open shard: {error}") from error
    with stream:
        status = os.fstat(stream.fileno())
        members: list[Member] = []
        damaged = ""
        try:
            archive = tarfile.open(fileobj=stream, mode="r:")
        except (tarfile.TarError, OSError, EOFError, ValueError) as error:
            if status.st_size == 0:
                return ShardIndex(tar_path, status.st_mtime_ns, ())
            raise UnreadableFile(f"not a readable uncompressed tar ({error})") from error
        try:
            while True:
                info = archive.next()
                if info is None:
                    break
                archive.members.clear()  # headers only; memory stays one member
                if info.isdir():
                    continue
                name, refused = _normalised(info.name)
                if not refused and not info.isreg():
                    kind = "symbolic link" if info.issym() else "hard link" if info.islnk() else "device, FIFO or other special member"
                    refused = f"a {kind} inside the tar, not a regular file member"
                elif not refused and info.offset_data + info.size > status.st_size:
                    refused = f"declares {info.size} bytes but the shard ends {status.st_size - info.offset_data} bytes after its header"
                elif not refused and info.size > MAX_MEMBER_BYTES:
                    refused = f"declares {info.size} bytes, above the {MAX_MEMBER_BYTES} that datus reads from a tar member"
                members.append(Member(tar_path, name, info.offset_data, info.size, refused))
        except (tarfile.TarError, OSError, EOFError, ValueError, UnicodeError) as error:
            damaged = f"damaged tar after {len(members)} member(s): {error}"
    latest: dict[str, int] = {}
    for position, member in enumerate(members):
        latest[member.name] = position
    kept = tuple(
        member if latest[member.name] == position or member.refused
        else Member(member.tar, member.name, member.offset, member.size, "superseded by a later member of the same name")
        for position, member in enumerate(members)
    )
    return ShardIndex(tar_path, status.st_mtime_ns, kept, damaged)


def digest(shards: list[Path], base: Path) -> dict[str, object]:
    """What a run over ``shards`` was made from: their names below ``base``, sizes and times (for ``run.json``)."""
    hasher, names = hashlib.sha256(), []
    for shard in shards:
        status = os.stat(shard)
        name = shard_stem(shard, base) + TAR_SUFFIX
        names.append(name)
        hasher.update(f"{name}\0{status.st_size}\0{status.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
    described: dict[str, object] = {"count": len(shards), "digest": hasher.hexdigest()[:32]}
    if len(names) <= 1000:
        described["names"] = names
    return described


# --- reading members: one handle per tar and process, one cached index per tar --------------------

_HANDLES: OrderedDict[tuple[int, str], tuple[int, os.stat_result]] = OrderedDict()
"""(process id, tar) -> (descriptor, its status when opened); keyed by process so that forked loader workers open their own."""
_INDEXES: OrderedDict[str, tuple[tuple[int, int, int], dict[str, Member]]] = OrderedDict()
_KEEP = 16


def _handle(tar: str) -> int:
    """This process's open descriptor of ``tar``, reopened when the file at the path changed (one ``stat`` a read)."""
    key = (os.getpid(), tar)
    if key in _HANDLES:
        descriptor, held = _HANDLES[key]
        if _same_file(os.stat(tar), held):
            _HANDLES.move_to_end(key)
            return descriptor
        del _HANDLES[key]  # rewritten or replaced: its members now lie at other offsets
        os.close(descriptor)
    with open_regular_file(Path(tar)) as stream:
        descriptor = os.dup(stream.fileno())
    _HANDLES[key] = (descriptor, os.fstat(descriptor))
    while len(_HANDLES) > _KEEP:
        (pid, _), (old, _) = _HANDLES.popitem(last=False)
        if pid == os.getpid():
            os.close(old)
    return descriptor


def _same_file(now: os.stat_result, held: os.stat_result) -> bool:
    return (now.st_ino, now.st_dev, now.st_size, now.st_mtime_ns) == (held.st_ino, held.st_dev, held.st_size, held.st_mtime_ns)


def read_member(member: Member) -> io.BytesIO:
    """The data of ``member`` as an in-memory stream (one ``pread`` through the process's handle of its tar).

    Raises:
        UnreadableFile: the member was refused at listing, or the tar ends before its data.
    """
    if member.refused:
        raise UnreadableFile(member.refused)
    descriptor = _handle(member.tar)
    data = os.pread(descriptor, member.size, member.offset)
    if len(data) != member.size:
        raise UnreadableFile(f"the shard ends {len(data)} bytes into this {member.size}-byte member (cut short)")
    return io.BytesIO(data)


def split_member_path(path: Path | str) -> tuple[str, str] | None:
    """(tar, member name) when ``path`` passes through a regular ``.tar`` file, else None."""
    text = os.path.abspath(path)
    position = 0
    while True:
        found = text.lower().find(TAR_SUFFIX + "/", position)
        if found < 0:
            return None
        tar = text[: found + len(TAR_SUFFIX)]
        try:
            if stat.S_ISREG(os.stat(tar).st_mode):
                return tar, text[found + len(TAR_SUFFIX) + 1 :]
        except OSError:
            return None
        position = found + 1


def _member_of(path: Path | str) -> Member:
    parts = split_member_path(path)
    if parts is None:
        raise FileNotFoundError(f"{path}: no such file")
    tar, name = parts
    status = os.stat(tar)
    mark = (status.st_ino, status.st_size, status.st_mtime_ns)
    cached = _INDEXES.get(tar)
    if cached is None or cached[0] != mark:
        index = index_shard(Path(tar))
        cached = (mark, index.by_name())
        _INDEXES[tar] = cached
        while len(_INDEXES) > _KEEP:
            _INDEXES.popitem(last=False)
    _INDEXES.move_to_end(tar)
    member = cached[1].get(name)
    if member is None:
        raise FileNotFoundError(f"{path}: no member {name!r} in {tar}")
    return member


def open_member_path(path: Path | str) -> io.BytesIO:
    """Read the member that a path through a tar names (see the module docstring)."""
    member = _member_of(path)
    if member.refused:
        raise NotRegularFile(f"{path}: {member.refused}")
    return read_member(member)


def member_mark(path: Path | str) -> tuple[int, int]:
    """(member size, the tar's modification time in ns): the ``image_mark`` of a member.

    A rewritten shard changes the time of all its members, so they are predicted again; an
    untouched shard keeps every record. Raises FileNotFoundError when the member is gone.
    """
    member = _member_of(path)
    parts = split_member_path(path)
    assert parts is not None
    return member.size, os.stat(parts[0]).st_mtime_ns


def iter_samples(index: ShardIndex) -> Iterator[tuple[Member, Member | None]]:
    """(image member, its ``.seg.png`` mask member (any case) or None) for every image-named member, in tar order."""
    by_name = index.by_name()
    masks = {name.lower()[: -len(MASK_SUFFIX)]: mask for name, mask in by_name.items() if name.lower().endswith(MASK_SUFFIX)}
    for member in index.members:
        lower = member.name.lower()
        if lower.endswith(MASK_SUFFIX) or posixpath.splitext(lower)[1] not in IMAGE_EXTENSIONS:
            continue
        if by_name.get(member.name) is not member:
            yield member, None  # an earlier member of a repeated name: refused as superseded
            continue
        # a refused mask (a link, a name leaving the shard) is still paired: scoring lists its reason
        yield member, masks.get(posixpath.splitext(lower)[0])
