"""The ``datus`` command: ``predict`` (a LightningCLI run), ``cluster``, ``evaluate``, ``prepare``.

``main(args)`` is importable so tests run the real CLI in-process. Heavy imports happen inside
the commands: Louvain worker processes are spawned and re-import the ``__main__`` module, so
keeping this module light makes them start in a fraction of a second instead of seconds.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

USAGE = """usage: datus <command> [options]

commands:
  predict   discover segments, embed, cluster, paint and evaluate (LightningCLI; see datus predict --help)
  cluster   re-cluster a finished run's shards with other K / engine / PCA, without the ViT
  evaluate  score any folder of predicted label PNGs against ground truth
  prepare   convert SUIM, CamVid, COCO-Stuff-27 or Cityscapes from their published layouts to the DatUS layout

Run `datus <command> --help` for the options of one command.
"""


@contextmanager
def _missing_input_is_a_configuration_error() -> Iterator[None]:
    """A missing input folder is the user's to fix: its message names it, no traceback needed."""
    from datus.errors import ConfigurationError

    try:
        yield
    except FileNotFoundError as error:
        raise ConfigurationError(str(error)) from error


_PREPARE_ONLY = {
    "classes": ("suim",),
    "size_mismatch": ("suim",),
    "image_list": ("cocostuff27",),
}
"""Options of `datus prepare` that apply to some datasets only."""


def _prepare_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="datus prepare",
        description="Convert a published dataset to the DatUS layout. All or nothing: OUT is written only "
        "when the whole conversion succeeded.",
    )
    parser.add_argument("dataset", choices=["suim", "camvid", "cocostuff27", "cityscapes"])
    parser.add_argument(
        "raw_dir",
        type=Path,
        help="the dataset as downloaded (SUIM: holds train_val/; CamVid: train/, trainannot/; COCO-Stuff: images/, "
        "stuffthingmaps_trainval2017/; Cityscapes: leftImg8bit/, gtFine/)",
    )
    parser.add_argument("out_dir", type=Path, help="new (or empty) folder for the DatUS layout")
    parser.add_argument(
        "--classes", choices=["coarse", "all"], default=None, help="SUIM only: DatUS 6-class grouping (default) or all 8"
    )
    parser.add_argument(
        "--size_mismatch",
        choices=["crop", "error"],
        default=None,
        help="SUIM only: a mask taller/wider than its image is cropped to its top-left (crop, default) or refused "
        "(error)",
    )
    parser.add_argument(
        "--image_list",
        type=Path,
        default=None,
        help="cocostuff27 only: convert only the image ids listed in this file (e.g. the curated "
        "Coco164kFull_Stuff_Coarse.txt)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier `datus prepare` output in OUT, once the new conversion has succeeded",
    )
    parser.add_argument(
        "--skip_damaged",
        action="store_true",
        help="leave out (and list) pairs with a truncated or undecodable file instead of refusing",
    )
    parser.add_argument("--workers", type=int, default=None, help="threads decoding and writing files (default: up to 8)")
    return parser


def run_prepare(args: Sequence[str]) -> None:
    from datus.errors import ConfigurationError
    from datus.prepare import format_report, prepare_camvid, prepare_cityscapes, prepare_cocostuff27, prepare_suim

    options = _prepare_parser().parse_args(args)
    for option, datasets in _PREPARE_ONLY.items():
        if getattr(options, option) is not None and options.dataset not in datasets:
            raise ConfigurationError(
                f"--{option} applies to {', '.join(datasets)} only, not {options.dataset}; drop it"
            )
    common = {"overwrite": options.overwrite, "skip_damaged": options.skip_damaged, "workers": options.workers}
    with _missing_input_is_a_configuration_error():
        if options.dataset == "suim":
            report = prepare_suim(
                options.raw_dir,
                options.out_dir,
                classes=options.classes or "coarse",
                size_mismatch=options.size_mismatch or "crop",
                **common,
            )
        elif options.dataset == "camvid":
            report = prepare_camvid(options.raw_dir, options.out_dir, **common)
        elif options.dataset == "cocostuff27":
            report = prepare_cocostuff27(options.raw_dir, options.out_dir, image_list=options.image_list, **common)
        else:
            report = prepare_cityscapes(options.raw_dir, options.out_dir, **common)
    print(format_report(report))


def _evaluate_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="datus evaluate", description="Hungarian-matched mIoU of any predicted label PNGs.")
    parser.add_argument("--pred", type=Path, required=True, help="folder of predicted label PNGs")
    parser.add_argument("--gt", type=Path, required=True, help="folder of ground-truth label PNGs (same relative paths)")
    parser.add_argument(
        "--num_classes",
        type=int,
        default=None,
        help="C; default: from the classes.json in --gt or up to 3 folders above it (written by datus prepare)",
    )
    parser.add_argument("--num_clusters", type=int, default=None, help="default: largest predicted id + 1")
    parser.add_argument("--ignore_index", type=int, default=None, help="default: from classes.json, else 255")
    parser.add_argument("--output_dir", type=Path, required=True)
    return parser


def run_evaluate(args: Sequence[str]) -> dict[str, Any]:
    from datus.evaluate import evaluate_folders
    from datus.metrics import format_table

    options = _evaluate_parser().parse_args(args)
    with _missing_input_is_a_configuration_error():
        metrics = evaluate_folders(
            options.pred,
            options.gt,
            options.num_classes,
            options.output_dir,
            ignore_index=options.ignore_index,
            num_clusters=options.num_clusters,
        )
    print(format_table(metrics, metrics["class_names"]))
    if metrics["classes_file"] is not None:
        print(f"classes from {metrics['classes_file']}")
    print(f"metrics written to {options.output_dir / 'metrics.json'}")
    return metrics


_OWN_PACKAGES = ("datus", "datamodules", "callbacks")


def _show_own_logs() -> None:
    """Print this project's INFO logs on stderr.

    Only its own packages get the handler: a root handler would print every Lightning message
    twice, since Lightning already attaches one to its own logger. Idempotent, for in-process
    reruns of :func:`main`.
    """
    for name in _OWN_PACKAGES:
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO)
        if not any(getattr(handler, "datus_cli", False) for handler in logger.handlers):
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
            handler.datus_cli = True  # type: ignore[attr-defined]
            logger.addHandler(handler)


def main(args: Sequence[str] | None = None) -> None:
    """Entry point of the ``datus`` console script and ``python -m datus``.

    Returns nothing (a console script passes the return value to ``sys.exit``); every result
    is in the output folder.
    """
    arguments = list(sys.argv[1:] if args is None else args)
    _show_own_logs()
    if not arguments or arguments[0] in ("-h", "--help"):
        print(USAGE)
        return None
    command, rest = arguments[0], arguments[1:]
    if command == "predict":
        from datus.predict import run_predict

        run_predict(rest)
    elif command == "cluster":
        from datus.postprocess import run_cluster_command

        run_cluster_command(rest)
    elif command == "evaluate":
        run_evaluate(rest)
    elif command == "prepare":
        run_prepare(rest)
    else:
        print(f"datus: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        raise SystemExit(2)


def console_main() -> None:
    """The console script: mistakes in options print one line naming the fix, exit status 2."""
    from datus.errors import ConfigurationError

    try:
        main()
    except ConfigurationError as error:
        print(f"datus: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
