"""A dataset's ``classes.json`` (written by ``datus prepare``): found beside the ground truth and read.

Scoring, the report and ``datus evaluate`` all read it through here, one search depth and one
check, from a module light enough for painting workers.
"""

from __future__ import annotations

import json
from pathlib import Path

from datus.core.errors import ConfigurationError
from datus.core.io import open_regular
from datus.runfolder.run import CLASSES_FILE

CLASSES_SEARCH_DEPTH = 3
"""How many folders above ``gt_dir`` are searched for ``classes.json`` (``OUT/<split>/true_masks/<city>``)."""


def find_classes_file(gt_dir: Path) -> Path | None:
    """The ``classes.json`` in ``gt_dir`` or the nearest folder above it (up to 3 levels).

    ``datus prepare`` writes it at the dataset root, two levels above ``<split>/true_masks``.
    """
    folder = Path(gt_dir).absolute()
    for candidate in [folder, *folder.parents][: CLASSES_SEARCH_DEPTH + 1]:
        if (candidate / CLASSES_FILE).is_file():
            return candidate / CLASSES_FILE
    return None


def read_classes_file(path: Path) -> tuple[list[str], int | None]:
    """Class names and ignore index (None when absent) from a ``classes.json``.

    Raises:
        ConfigurationError: the file is not JSON or has no list of class names.
    """
    try:
        with open_regular(Path(path)) as stream:
            described = json.loads(stream.read().decode("utf-8"))
    except (OSError, ValueError, RecursionError) as error:
        raise ConfigurationError(f"{path}: not a readable classes.json ({error}); fix or remove it") from None
    names = described.get("classes") if isinstance(described, dict) else None
    if not isinstance(names, list) or not names or not all(isinstance(name, str) for name in names):
        raise ConfigurationError(f'{path}: expected a "classes" list of class names; fix or remove it')
    ignore_index = described.get("ignore_index")
    return names, ignore_index if isinstance(ignore_index, int) else None
