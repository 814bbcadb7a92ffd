"""The options of ``datus predict`` as data (``predict_options.json``), for help and checks without Lightning.

LightningCLI builds predict's parser from signatures and docstrings, which takes seconds of
imports; the same options are kept here as data, written by
:func:`datus.commands.predict.write_option_table` and kept equal to the parser by a test. Low in the
layers: ``datus predict``'s early checks and ``datus cluster``'s help (which shares the cluster,
eval and crf options) read it.
"""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path
from typing import Any

TABLE_FILE = Path(__file__).with_name("predict_options.json")


@cache
def table() -> dict[str, Any]:
    """``{"groups": {name: title}, "options": [{flag, group, kind, choices, nullable, required, open, default, help}]}``."""
    return json.loads(TABLE_FILE.read_text(encoding="utf-8"))


def first_sentence(text: str) -> str:
    return re.split(r"\.\s+(?=[A-Z])", text)[0].rstrip(".")


def option_help(flag: str) -> str:
    """The first sentence of an option's description, with ``None`` as the user types it (``null``)."""
    option = next(option for option in table()["options"] if option["flag"] == flag)
    return re.sub(r"\bNone\b", "null", first_sentence(option["help"]))
