"""``datus prepare``: convert publishers' raw dataset layouts into the DatUS layout that the rest of datus reads.

One module per dataset, each importing only the shared core (no dataset module imports another):

- :mod:`datus.commands.prepare.core`: the output layout and the all-or-nothing rule, and what keeps them:
  ``PrepareReport``, pairing and indexing files, out-dir checks, staging into a hidden sibling
  and swapping it in, threaded conversion, damaged files, header checks, ``format_report``.
- :mod:`datus.commands.prepare.suim`: SUIM, RGB-coded masks (``prepare_suim``, ``decode_suim_mask``).
- :mod:`datus.commands.prepare.camvid`: SegNet's 11-class CamVid (``prepare_camvid``).
- :mod:`datus.commands.prepare.cocostuff`: COCO-Stuff-27 (``prepare_cocostuff27``, ``cocostuff27_from_fine``).
- :mod:`datus.commands.prepare.cityscapes`: Cityscapes, 27 classes (``prepare_cityscapes``,
  ``cityscapes27_from_label_ids``).

This package re-exports the names the CLI, the scripts and the tests use.
"""

from __future__ import annotations

from datus.commands.prepare.camvid import prepare_camvid
from datus.commands.prepare.cityscapes import CITYSCAPES_CLASSES, cityscapes27_from_label_ids, prepare_cityscapes
from datus.commands.prepare.cocostuff import COCOSTUFF27_CLASSES, cocostuff27_from_fine, prepare_cocostuff27
from datus.commands.prepare.core import PrepareReport, format_report
from datus.commands.prepare.suim import decode_suim_mask, prepare_suim

__all__ = [
    "CITYSCAPES_CLASSES",
    "COCOSTUFF27_CLASSES",
    "PrepareReport",
    "cityscapes27_from_label_ids",
    "cocostuff27_from_fine",
    "decode_suim_mask",
    "format_report",
    "prepare_camvid",
    "prepare_cityscapes",
    "prepare_cocostuff27",
    "prepare_suim",
]
