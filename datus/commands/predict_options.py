"""``datus predict``'s options without Lightning or timm: its help, and most mistakes, in a blink.

LightningCLI builds predict's parser from the signatures of the model, the data module and the
settings dataclasses, which takes seconds of imports. The options are also kept as data in
``predict_options.json`` (written by :func:`datus.commands.predict.write_option_table`, and kept equal
to the parser by a test), so that ``--help``, an unknown or abbreviated option, a value
that is not one of the choices, a missing required option or folder, and a config file with an
unknown key are answered before those imports. Everything else is still checked by LightningCLI.
"""

from __future__ import annotations

import difflib
import shutil
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from datus.core.errors import ConfigurationError
from datus.core.options import first_sentence, option_help, table

TOP_LEVEL = ("--config", "-c", "--print_config", "--seed_everything", "--help", "-h")
"""Options of LightningCLI itself, not in the table."""
REQUIRED = ("--data.root", "--output_dir")
BOOLEAN_WORDS = ("true", "false", "yes", "no", "on", "off", "1", "0")
"""What LightningCLI (jsonargparse) reads as a boolean, in any case; other choices are case-sensitive there too."""
HELP_LINES_PER_OPTION = 2
"""Longer descriptions are cut: the README's option tables say the rest."""

DESCRIPTION = (
    "Pseudo masks for a folder of images: segments from a frozen ViT, embedded, clustered, painted and, "
    "with ground truth, scored. Every option can also be set in a YAML file given with --config (its keys "
    "are the option names without --, nested by the dot); flags after it override it."
)
EXAMPLE = (
    "example: datus predict --data.root PHOTOS --output_dir runs/mine --model.embedding packed --cluster.num_clusters 6"
)


def help_text(width: int | None = None) -> str:
    """Predict's help: every option once, in one line or two, grouped like the pipeline."""
    width = width or min(shutil.get_terminal_size((100, 24)).columns, 110)
    lines = ["usage: datus predict --data.root FOLDER --output_dir FOLDER [--config FILE.yaml] [options]", ""]
    lines += textwrap.wrap(DESCRIPTION, width) + ["", EXAMPLE, ""]
    options = table()["options"]
    flag_width = 34
    sections: list[tuple[str, list[tuple[str, str]]]] = [(
        "general",
        [("-c, --config FILE", "a YAML file of options (e.g. configs/demo.yaml); may be given more than once."),
         ("--print_config", "print the resolved configuration and exit."),
         ("--seed_everything SEED", "seed of every random generator (default 0).")],
    )]  # fmt: skip
    for group, title in [("", "output"), *table()["groups"].items()]:
        rows = [(_flag_label(option), _describe(option)) for option in options if option["group"] == group]
        sections.append((first_sentence(title), rows))
    for title, rows in sections:
        lines.append(f"{title}:")
        for flag, text in rows:
            wrapped = textwrap.wrap(text, max(width - flag_width - 2, 30), max_lines=HELP_LINES_PER_OPTION, placeholder=" ...")
            if len(flag) >= flag_width - 2:
                lines += [f"  {flag}", *(" " * flag_width + part for part in wrapped)]
            else:
                lines.append(f"  {flag:<{flag_width - 2}}{wrapped[0]}")
                lines += [" " * flag_width + part for part in wrapped[1:]]
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _flag_label(option: dict[str, Any]) -> str:
    if option["choices"]:
        return f"{option['flag']} {{{','.join(option['choices'])}}}"
    name = option["flag"].lstrip("-").rsplit(".", 1)[-1]
    metavar = {"int": "N", "float": "X"}.get(option["kind"], "FOLDER" if name in ("output_dir", "root") else name.upper())
    return f"{option['flag']} {metavar}"


def _describe(option: dict[str, Any]) -> str:
    """The option's default, then the first sentence of its docstring (``None`` as the user types it)."""
    first = option_help(option["flag"])
    if option["required"] or option["flag"] in REQUIRED:
        return f"[required] {first}."
    default = option["default"]
    shown = "null" if default is None else str(default).lower() if isinstance(default, bool) else str(default)
    return f"[{shown}] {first}."


def check_arguments(arguments: Sequence[str]) -> None:
    """Refuse, in one line naming the fix, what is wrong with predict's arguments before any import.

    Raises:
        ConfigurationError: an unknown or abbreviated option (with the nearest name), a value not
            among an option's choices or not a number, an unreadable config file or an unknown key
            in it, a missing ``--data.root`` or ``--output_dir``, or a data folder that does not exist.
    """
    options = {option["flag"]: option for option in table()["options"]}
    given: dict[str, Any] = {}
    index = 0
    while index < len(arguments):
        argument = arguments[index]
        index += 1
        if not argument.startswith("-"):
            shards = " (a brace pattern such as train-{0000..0099}.tar must be quoted, or the shell expands it)"
            hint = shards if ".tar" in argument else ""
            raise ConfigurationError(f"unexpected argument {argument!r}: every value follows its option{hint} (see datus predict --help)")
        flag, equals, value = argument.partition("=")
        if flag.startswith("-c") and not flag.startswith("--") and len(flag) > 2:  # -cFILE, as argparse reads it
            flag, equals, value = "-c", "=", argument[2:]
        if flag in TOP_LEVEL or _is_group(flag) or _opens(flag, options):
            takes_value = flag not in ("-h", "--help", "--print_config") and not equals
            if takes_value and index < len(arguments) and not arguments[index].startswith("--"):
                value = arguments[index]
                index += 1
            if flag == "--seed_everything" and value not in ("true", "false", "True", "False") and not _is_seed(value):
                raise ConfigurationError(f"--seed_everything {value}: give a whole number from 0 to {2**32 - 1}, or true")
            if flag in ("-c", "--config"):
                _read_config(Path(value), options, given)
            elif _is_group(flag) and value:  # --data FILE: that group's options
                _read_config(Path(value), options, given, group=flag[2:])
            continue
        if flag not in options:
            nearest = difflib.get_close_matches(flag, [*options, *TOP_LEVEL], n=1)
            hint = f"; did you mean {nearest[0]}?" if nearest else ""
            raise ConfigurationError(f"unknown option {flag}{hint} (see datus predict --help)")
        if not equals:
            if index >= len(arguments):
                raise ConfigurationError(f"{flag} needs a value (see datus predict --help)")
            value = arguments[index]
            index += 1
        given[flag] = _checked(options[flag], value)
    if any(argument.startswith("--print_config") for argument in arguments):
        return  # LightningCLI prints the configuration without needing the run's folders
    for flag in ("--data.root", "--output_dir"):
        if given.get(flag) in (None, "null"):
            raise ConfigurationError(f"{flag} is required: {first_sentence(options[flag]['help']).lower()} (see datus predict --help)")
    from datus.core.io import locate_images

    split, mask_dir = given.get("--data.split"), given.get("--data.mask_dir")
    locate_images(Path(str(given["--data.root"])), None if split in (None, "null") else str(split),
                  None if mask_dir in (None, "null") else Path(str(mask_dir)), announce=False)  # fmt: skip


def _is_seed(value: str) -> bool:
    """What Lightning's ``seed_everything`` takes: an integer in [0, 2**32)."""
    return value.isdigit() and int(value) < 2**32


def _is_group(flag: str) -> bool:
    """``--model FILE``: a whole group's options from a YAML file."""
    return flag[2:] in table()["groups"]


def _opens(flag: str, options: dict[str, Any]) -> bool:
    """``--trainer.callbacks+=...`` or ``--model.backbone_kwargs.depth``: sub-keys of a structured option."""
    return any(flag.startswith(name) and flag[len(name) : len(name) + 1] in (".", "+") for name, option in options.items() if option["open"])


def _checked(option: dict[str, Any], value: str) -> Any:
    """The value as given, refused when it cannot be one of the option's values."""
    if value == "null" and (option["nullable"] or option["default"] is None):
        return None
    booleans = option["choices"] == ["true", "false"]
    accepted = [*option["choices"], *BOOLEAN_WORDS] if booleans else option["choices"]
    if option["choices"] and (value.lower() if booleans else value) not in accepted:
        nearest = difflib.get_close_matches(value, option["choices"], n=1)
        hint = f"; did you mean {nearest[0]}?" if nearest else ""
        raise ConfigurationError(f"{option['flag']} {value}: expected one of {', '.join(option['choices'])}{hint}")
    if option["kind"] in ("int", "float"):
        try:
            int(value) if option["kind"] == "int" else float(value)
        except ValueError:
            raise ConfigurationError(f"{option['flag']} {value}: expected a{'n integer' if option['kind'] == 'int' else ' number'}") from None
    return value


def _read_config(path: Path, options: dict[str, Any], given: dict[str, Any], group: str | None = None) -> None:
    """Check a ``--config`` file's keys (or a ``--<group>`` file's), and note the values later flags may override."""
    import yaml

    option = f"--{group or 'config'}"
    try:
        content = yaml.safe_load(path.expanduser().read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigurationError(f"{option} {path}: no such file") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise ConfigurationError(f"{option} {path}: not a readable YAML file ({type(error).__name__})") from None
    if content is None:
        return
    if not isinstance(content, dict):
        raise ConfigurationError(f"{option} {path}: expected a mapping of option names, got {type(content).__name__}")
    if group is not None:
        content = {group: content}
    for key, value in content.items():
        if isinstance(value, dict) and isinstance(key, str) and key in table()["groups"]:
            entries = [(f"--{key}.{name}", inner) for name, inner in value.items()]
        else:
            entries = [(f"--{key}", value)]
        for flag, inner in entries:
            if flag in options:
                given[flag] = inner
            elif flag not in ("--seed_everything",) and not _opens(flag, options):
                nearest = difflib.get_close_matches(flag, list(options), n=1)
                hint = f"; did you mean {nearest[0][2:]}?" if nearest else ""
                raise ConfigurationError(f"{option} {path}: unknown key {flag[2:]}{hint}")
