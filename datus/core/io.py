"""File input and output that every stage shares: atomic writers and untrusted readers.

Writers: a run can be killed at any moment, and readers (a resumed run included) must never
see a half-written file. Each writer writes to a temporary file in the destination folder and
renames it into place (``os.replace`` is atomic on POSIX). Temporary names have one fixed,
short format (:data:`TEMPORARY_NAME`), independent of the destination's name, so that a long
file name never makes its temporary too long, and so that datus can recognise, and only ever
remove, temporaries it created itself (see :meth:`datus.runfolder.run.Run.remove_temporaries`).

Readers: every image and label map is input datus did not write. They raise
:class:`UnreadableFile` naming the file, and decode large images at a reduced size when only
a small version is needed, so that memory stays bounded.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import zlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, BinaryIO

import numpy as np
from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

from datus.core.errors import ConfigurationError
from datus.core.files import IMAGE_EXTENSIONS, UnreadableFile, open_regular_file


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_current_umask()
"""Permissions of every output file: as an ordinary ``open()`` would give.

Read once at import: ``os.umask`` can only be queried by setting it, which is not thread-safe.
"""

TEMPORARY_PREFIX = ".datus-tmp-"
TEMPORARY_NAME = re.compile(r"\.datus-tmp-[0-9a-f]{16}")
"""Full-match pattern of the temporaries :func:`atomic_path` creates, and of nothing else."""

MAX_IMAGE_PIXELS = 250_000_000
"""Largest image datus decodes; large survey or aerial images are legitimate input (PIL stops at 89 MP)."""

REDUCE_ABOVE_PIXELS = 4096 * 4096
"""Images larger than this are decoded at a reduced scale when only a small version is needed."""

REDUCED_MIN_SIDE = 1024
"""Shorter side kept when an image is decoded at a reduced scale (then resized properly)."""

Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS


def open_regular(path: Path) -> BinaryIO:
    """:func:`datus.core.files.open_regular_file`, or the member of a tar shard that a path through it names (:mod:`datus.core.tars`).

    Every file datus reads (images, masks, shards, its own run files) goes through here.
    """
    try:
        return open_regular_file(path)
    except NotADirectoryError:
        from datus.core.tars import open_member_path

        return open_member_path(path)  # type: ignore[return-value]


def input_mark(path: Path | str) -> tuple[int, int]:
    """(size, modification time in ns) of an input image: a file, or a member of a tar shard.

    Raises:
        OSError: the file, or the member, is gone.
    """
    try:
        status = os.stat(path)
    except NotADirectoryError:
        from datus.core.tars import member_mark

        return member_mark(path)
    return status.st_size, status.st_mtime_ns


def check_pixels(width: int, height: int) -> None:
    """Refuse an image above :data:`MAX_IMAGE_PIXELS`, the one limit that reading images and shards share.

    PIL refuses only above twice its own limit and merely warns between, so an image of 250-500
    MP would be predicted, then refused by the shard reader, and block the run for good.
    """
    if width * height > MAX_IMAGE_PIXELS:
        raise UnreadableFile(
            f"{width} x {height} is above {MAX_IMAGE_PIXELS} pixels, the largest image datus reads; tile or "
            "downscale it to include it"
        )


DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    zlib.error,
    Image.DecompressionBombError,
)
"""What PIL raises for truncated, corrupt, oversized or not-an-image files."""


def decode_reason(error: BaseException) -> str:
    """What went wrong decoding a file, in words."""
    if isinstance(error, UnidentifiedImageError):
        return "not a readable image (empty, cut short or another format)"
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


@contextmanager
def atomic_path(destination: Path) -> Iterator[Path]:
    """Yield a fresh temporary path beside ``destination``; rename it into place on success.

    Writers must choose the format explicitly (the temporary has no extension).
    """
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    temporary = destination.parent / f"{TEMPORARY_PREFIX}{secrets.token_hex(8)}"
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    os.close(descriptor)
    try:
        yield temporary
        os.replace(temporary, destination)
    finally:
        temporary.unlink(missing_ok=True)


def _write_with(destination: Path, write: Callable[[IO[bytes]], None], durable: bool = True) -> None:
    with atomic_path(destination) as temporary, open(temporary, "wb") as stream:
        write(stream)
        stream.flush()
        if durable:
            os.fsync(stream.fileno())


def json_text(payload: Any, indent: int | None = 2) -> str:
    """JSON that reads as UTF-8; file names that are not valid UTF-8 are kept as escapes.

    Paths of undecodable file names reach Python as lone surrogates, which UTF-8 cannot encode;
    ``\\udcXX`` escapes keep them exact (``json.loads`` gives the same path back).
    """
    text = json.dumps(payload, indent=indent, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(payload, indent=indent, ensure_ascii=True)
    return text


def write_lines(destination: Path, lines: Iterable[str]) -> None:
    """Write UTF-8 lines as they come (memory: one line), atomically."""
    _write_with(destination, lambda stream: stream.writelines(f"{line}\n".encode("utf-8") for line in lines))


def write_json(destination: Path, payload: Any) -> None:
    """Write ``payload`` as indented JSON, atomically."""
    write_text(destination, json_text(payload) + "\n")


def write_text(destination: Path, text: str, durable: bool = True) -> None:
    """Write UTF-8 text atomically.

    ``durable=False`` skips the ``fsync`` (still atomic against a killed process, not against a
    power cut): for many small derived files, such as the HTML view's pages, where 2,000 syncs
    would cost seconds.
    """
    _write_with(destination, lambda stream: stream.write(text.encode("utf-8")), durable)


PICTURE_COMPRESSION = 1
"""zlib level of PNG pictures for people (report, galleries, colour masks, legends): two to three
times faster to encode than zlib's default 6, for files 10-20 % larger. Label maps keep 6."""


MASK_EXTENSION = ".png"
"""Ground truth pairs with an image by relative path and stem: ``images/a/b.jpg`` <-> ``masks/a/b.png``."""


def paired_mask(image_path: Path, image_dir: Path, mask_dir: Path) -> Path | None:
    """The ground-truth file of ``image_path`` in ``mask_dir`` (the one pairing rule), or None.

    The image's path below ``image_dir`` is tried as given, then resolved (``image_dir`` may be
    recorded resolved, the image path not). Only a regular file counts.
    """
    for image, root in ((Path(os.path.abspath(image_path)), Path(image_dir)), (Path(image_path).resolve(), Path(image_dir).resolve())):
        if image.is_relative_to(root):
            relative = image.relative_to(root)
            if any(part.lower().endswith(".tar") for part in relative.parts[:-1]):  # a tar member: <shard>/<key>.png
                relative = Path(*(part[:-4] if part.lower().endswith(".tar") else part for part in relative.parts))
            candidate = Path(mask_dir) / relative.with_suffix(MASK_EXTENSION)
            return candidate if candidate.is_file() else None
    return None


PNG_NOTE = "datus"
"""Key of the PNG text chunk in which a mask names what it was painted from (read with the header)."""


def write_png(destination: Path, array: np.ndarray, compress_level: int = 6, note: str | None = None) -> None:
    """Write a uint8/uint16 label map (H x W) or an RGB image (H x W x 3) as PNG, atomically.

    Label maps compress best at the default; pass :data:`PICTURE_COMPRESSION` for pictures.
    ``note`` goes to a text chunk before the pixels (:data:`PNG_NOTE`), readable without decoding.
    """
    image = Image.fromarray(np.ascontiguousarray(array))  # uint16 becomes a 16-bit greyscale PNG
    write_image(destination, image, compress_level, note)


def write_image(
    destination: Path, image: Image.Image, compress_level: int = PICTURE_COMPRESSION, note: str | None = None
) -> None:
    """Write a PIL image (a picture, unless told otherwise) as PNG, atomically."""
    info = None
    if note is not None:
        info = PngImagePlugin.PngInfo()
        info.add_text(PNG_NOTE, note)
    _write_with(destination, lambda stream: image.save(stream, format="PNG", compress_level=compress_level, pnginfo=info))


def write_jpeg(destination: Path, array: np.ndarray, quality: int = 90) -> None:
    """Write an RGB picture (H x W x 3 uint8) as JPEG, atomically: photographs, not labels.

    Ten times faster to encode than a PNG of a photograph, and several times smaller.
    """
    image = Image.fromarray(np.ascontiguousarray(array))
    _write_with(destination, lambda stream: image.save(stream, format="JPEG", quality=quality))


def write_npz(destination: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write arrays to an uncompressed ``.npz``, atomically (no pickled objects inside)."""
    _write_with(destination, lambda stream: np.savez(stream, **arrays))


def write_npy(destination: Path, array: np.ndarray) -> None:
    """Write one ``.npy`` atomically (no pickled objects)."""
    _write_with(destination, lambda stream: np.save(stream, array, allow_pickle=False))


def read_json(path: Path) -> Any:
    """Parse a JSON file datus wrote earlier; a damaged one names itself and the fix."""
    try:
        with open_regular(path) as stream:
            return json.loads(stream.read().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:  # nesting too deep: crafted
        raise UnreadableFile(f"{path} is damaged ({error}); delete it and run the command again") from error


def read_label_png(path: Path) -> np.ndarray:
    """Read a single-channel label map (8 or 16 bit) with its values untouched.

    The array keeps the file's own integer type (uint8 for most masks), so that a 250 MP map
    costs 250 MB, not the 2 GB of int64; callers widen small blocks when they compute.
    """
    try:
        with open_regular(path) as stream, Image.open(stream) as image:
            check_pixels(*image.size)
            if image.mode not in ("L", "P", "I;16", "I", "1"):
                raise UnreadableFile(
                    f"{path}: expected a single-channel label map (mode L, P or I;16), got mode "
                    f"{image.mode!r}. Convert RGB-coded masks first, e.g. with `datus prepare`."
                )
            labels = np.asarray(image)
            return labels.astype(np.uint8) if labels.dtype == bool else labels
    except UnreadableFile:
        raise
    except DECODE_ERRORS as error:
        raise UnreadableFile(f"{path} cannot be decoded ({decode_reason(error)})") from error


def load_rgb(path: Any, min_side: int | None = None) -> tuple[Image.Image, tuple[int, int]]:
    """Decode any supported image as 8-bit RGB with its EXIF orientation applied.

    Args:
        path: the image file, a path through a tar shard, or a :class:`datus.core.tars.Member`.
        min_side: when only a version with this shorter side is needed (model input,
            thumbnails), an image above :data:`REDUCE_ABOVE_PIXELS` is decoded at a reduced
            scale whose shorter side stays at least ``max(min_side, REDUCED_MIN_SIDE)`` (JPEG
            draft mode, then integer box reduction): a 250 MP photo then costs megabytes, not
            gigabytes. Ordinary images are decoded in full, so their pixels never depend on it.

    Returns:
        The RGB image and the (height, width) of the full-size image after EXIF rotation.

    Raises:
        UnreadableFile: the file is missing, truncated, not an image, or too large.

    16-bit greyscale is scaled to 8 bits by its full range (PIL's own conversion clips it);
    palette and alpha images are flattened on black; CMYK is converted.
    """
    try:
        with _open_input(path) as stream, Image.open(stream) as image:
            width, height = image.size
            check_pixels(width, height)
            transposed = image.getexif().get(0x0112) in (5, 6, 7, 8)
            full_size = (width, height) if transposed else (height, width)
            if min_side is not None and width * height > REDUCE_ABOVE_PIXELS:
                keep = max(min_side, REDUCED_MIN_SIDE)
                image.draft("RGB", (keep, keep))
                factor = min(image.size) // keep
                image = image.reduce(factor) if factor > 1 else image
            image = ImageOps.exif_transpose(image)
            return _to_rgb(image), full_size
    except UnreadableFile:
        raise
    except (*DECODE_ERRORS, MemoryError) as error:
        raise UnreadableFile(decode_reason(error)) from error


def _open_input(source: Any) -> BinaryIO:
    if isinstance(source, (str, os.PathLike)):
        return open_regular(Path(source))
    from datus.core.tars import read_member

    return read_member(source)  # type: ignore[return-value]


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        values = np.asarray(image)
        scale = 65535 if values.max(initial=0) > 255 else 255
        grey = (np.clip(values, 0, scale).astype(np.uint32) * 255 + scale // 2) // scale
        return Image.fromarray(grey.astype(np.uint8)).convert("RGB")
    if image.mode == "F":
        values = np.asarray(image, dtype=np.float32)
        low, high = float(values.min(initial=0)), float(values.max(initial=1))
        grey = ((values - low) / max(high - low, 1e-12) * 255).round().astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", image.size, (0, 0, 0))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def locate_images(root: Path, split: str | None, mask_dir: Path | None, announce: bool = True) -> tuple[Path, Path | None]:
    """The image and mask folders of ``--data.*``, checked to exist and to hold an image.

    Cheap (stops at the first image), so the CLI runs it before building the model. A config
    made for the DatUS layout (``--data.split train``) pointed at a plain folder of photos reads
    that folder, saying so once (``announce``), instead of refusing the obvious command.
    """
    from datus.core.tars import is_tar_source, list_shards

    if is_tar_source(root):
        if split is not None and announce:
            logging.getLogger(__name__).warning("--data.root %s names tar shards: --data.split %s is not used", root, split)
        if mask_dir is not None and not Path(mask_dir).expanduser().is_dir():
            raise ConfigurationError(f"--data.mask_dir: no folder {mask_dir}.")
        _, shards = list_shards(root)
        missing = [shard for shard in shards if not shard.is_file()]
        if not shards or missing:
            raise ConfigurationError(
                f"--data.root: no tar shard {missing[0] if missing else root}"
                f"{f' (and {len(missing) - 1} more of the pattern)' if len(missing) > 1 else ''}. Point --data.root at "
                "a .tar file, a folder of them, or a pattern like train-{0000..0099}.tar."
            )
        return Path(root), Path(mask_dir).expanduser() if mask_dir is not None else None
    root = Path(root).expanduser()
    if not root.is_dir():
        raise ConfigurationError(f"--data.root: no folder {root}. Point --data.root at your images.")
    image_dir = root
    plain = split is not None and not (root / split / "images").is_dir()  # a layout config on a plain folder: read it
    if split is not None and not plain:
        image_dir, layout_masks = root / split / "images", root / split / "true_masks"
        mask_dir = layout_masks if layout_masks.is_dir() else None
    elif plain:
        splits = sorted(folder.parent.name for folder in root.glob("*/images") if folder.is_dir())
        if splits:
            raise ConfigurationError(
                f"--data.split {split}: no {root / str(split) / 'images'}; the splits of {root} are {', '.join(splits)}"
            )
        mask_dir = None
    if mask_dir is not None and not Path(mask_dir).is_dir():
        raise ConfigurationError(f"--data.mask_dir: no folder {mask_dir}.")
    holds_an_image = _holds_an_image(image_dir)
    if plain and announce and holds_an_image:
        logging.getLogger(__name__).info("reading %s as a plain folder of images (it has no %s/images folder)", root, split)
    if not holds_an_image:
        layout = f", and no ROOT/{split}/images folder for --data.split {split}" if plain else ""
        raise ConfigurationError(
            f"--data.root: no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) found under {image_dir}{layout}."
        )
    return image_dir, Path(mask_dir).expanduser() if mask_dir is not None else None


def _holds_an_image(folder: Path) -> bool:
    return any(path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file() for path in folder.rglob("*"))
