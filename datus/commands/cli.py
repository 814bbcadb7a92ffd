"""The ``datus`` command: ``predict`` (a LightningCLI run), ``cluster``, ``evaluate``, ``prepare``.

``main(args)`` is importable so tests run the real CLI in-process. Each command imports only
what it needs: ``cluster``, ``evaluate``, ``prepare`` and every ``--help`` but predict's load
neither Lightning nor timm, and Louvain worker processes (which re-import ``__main__``) start
in a fraction of a second.
"""

from __future__ import annotations

import argparse
import atexit
import difflib
import logging
import math
import os
import re
import signal
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, NoReturn

from datus import __version__
from datus.core.errors import ConfigurationError, one_line

USAGE = """usage: datus <command> [options]

commands:
  predict   discover segments, embed, cluster, paint and evaluate (see datus predict --help)
  cluster   re-cluster a finished run's segments with other settings, without the ViT
  evaluate  score any folder of predicted label maps against ground truth
  prepare   convert SUIM, CamVid, COCO-Stuff-27 or Cityscapes to the DatUS layout
  export    write a finished run's pseudo masks for training: Hugging Face Parquet, WebDataset tars, or
            mmsegmentation/detectron2 folders

Run `datus <command> --help` for the options of one command; `datus --version` for the version.
"""

_OWN_PACKAGES = ("datus",)


class CommandParser(argparse.ArgumentParser):
    """argparse that reports a mistake as one ``datus: error:`` line instead of usage plus error.

    Options are never abbreviated (``--cluster.num_cluster`` is a mistake, not ``num_clusters``),
    and an unknown option is answered with the nearest valid one.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message: str) -> NoReturn:
        unknown = re.match(r"unrecognized arguments: (\S+)", message)
        if unknown:
            flag = unknown[1].split("=", 1)[0]
            options = [option for action in self._actions for option in action.option_strings]
            nearest = difflib.get_close_matches(flag, options, n=1)
            if nearest:
                message += f"; did you mean {nearest[0]}?"
        raise ConfigurationError(f"{message} (see {self.prog} --help)")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of each message (tests and tools swap it)."""

    datus_cli = True

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


class _ConsoleFormatter(logging.Formatter):
    """``datus: message`` for information, ``datus: warning: message`` for warnings."""

    def format(self, record: logging.LogRecord) -> str:
        level = "" if record.levelno <= logging.INFO else f"{record.levelname.lower()}: "
        return f"datus: {level}{one_line(record.getMessage())}"


def _show_own_logs() -> None:
    """Print this project's INFO logs on stderr, once each.

    Only its own packages get the handler: a root handler would print every Lightning message
    twice, since Lightning already attaches one to its own logger. Idempotent, for in-process
    reruns of :func:`main`.
    """
    for name in _OWN_PACKAGES:
        logger = logging.getLogger(name)
        logger.setLevel(logging.ERROR if _other_rank() else logging.INFO)
        if not any(isinstance(handler, _StderrHandler) for handler in logger.handlers):
            handler = _StderrHandler()
            handler.setFormatter(_ConsoleFormatter())
            logger.addHandler(handler)


def _other_rank() -> bool:
    """Whether this process is a DDP rank other than the first (Lightning's launcher, torchrun or SLURM set these).

    Its information and warnings would repeat rank 0's on the same console; what it skips is
    gathered into rank 0's summary and ``skipped.json``, and its errors still print.
    """
    return any(os.environ.get(name, "0") != "0" for name in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))


def _cluster_parser(defaults: dict[str, dict[str, Any]]) -> CommandParser:
    from datus.stages.crf import CRFParams
    from datus.core.settings import ClusterSettings, EvaluationSettings, add_options

    parser = CommandParser(
        prog="datus cluster",
        description="Re-cluster a finished run's segment embeddings, repaint and re-evaluate, without the ViT. "
        "Defaults are the run's own settings (its config.yaml); each K gets RUN/clusters/k<K>/.",
    )
    parser.add_argument("--run", type=Path, required=True, help="the --output_dir of a datus predict run")
    parser.add_argument(
        "--score_only",
        action="store_true",
        help="score and describe each K (metrics, diagnostics, the sweep table) without writing masks, colours, "
        "galleries or a report: a quick sweep over K",
    )
    add_options(parser, ClusterSettings, "cluster", defaults.get("cluster", {}), many=frozenset({"num_clusters"}))
    add_options(parser, EvaluationSettings, "eval", defaults.get("eval", {}))
    add_options(parser, CRFParams, "crf", defaults.get("crf", {}))
    return parser


def run_cluster(args: Sequence[str]) -> list[dict[str, Any]]:
    """``datus cluster``: one results folder per K under ``RUN/clusters/k<K>/`` and a sweep table."""
    from datus.stages.crf import CRFParams, require_densecrf
    from datus.runfolder.run import Run
    from datus.core.settings import ClusterSettings, EvaluationSettings, from_options

    run_flag = _value_of("--run", args)
    defaults = _saved_settings(Path(run_flag)) if run_flag else {}
    options = _cluster_parser(defaults).parse_args(list(args))
    from datus.core.collective import Collective
    from datus.outputs.describe import sweep_row, write_sweep
    from datus.outputs.html_view import refresh_run_index
    from datus.stages.postprocess import postprocess

    run = Run(options.run)
    if not run.is_datus_run() or not run.shards():
        raise ConfigurationError(f"--run {options.run} is not a finished datus run (no run.json or shards/); give the --output_dir of datus predict")
    cluster_values = from_options(options, ClusterSettings, "cluster")
    try:
        evaluation = EvaluationSettings(**from_options(options, EvaluationSettings, "eval"))
        crf = CRFParams(**from_options(options, CRFParams, "crf"))
        sweep = [ClusterSettings(**{**cluster_values, "num_clusters": k}) for k in cluster_values["num_clusters"]]
    except (TypeError, ValueError) as error:  # e.g. a hand-edited config.yaml with values of the wrong type
        raise ConfigurationError(f"{error} (from the flags or {options.run / 'config.yaml'})") from error
    if cluster_values["crf"]:
        require_densecrf()
    rows = []
    with run.lock():
        run.remove_temporaries()
        for settings in sweep:
            results = run.cluster_results(settings.num_clusters)
            outcome = postprocess(
                run, results, settings, evaluation, Collective.current(), crf=crf, write_files=not options.score_only
            )
            print(outcome.console_text(), flush=True)
            rows.append(sweep_row(settings.num_clusters, outcome.summary, outcome.metrics))
        table = write_sweep(run, rows)
        refresh_run_index(run)  # the run's page links every clusters/k<K>/ now present
    print(table)
    return rows


def _value_of(flag: str, args: Sequence[str]) -> str | None:
    """The value of ``flag`` in raw arguments (``--flag V`` or ``--flag=V``), before parsing."""
    for index, argument in enumerate(args):
        if argument == flag and index + 1 < len(args):
            return args[index + 1]
        if argument.startswith(flag + "="):
            return argument.split("=", 1)[1]
    return None


def _saved_settings(run_dir: Path) -> dict[str, dict[str, Any]]:
    """The ``cluster``, ``eval`` and ``crf`` sections of a run's saved config.yaml (untrusted: only known keys)."""
    import dataclasses

    import yaml

    from datus.stages.crf import CRFParams
    from datus.core.io import open_regular
    from datus.runfolder.run import CONFIG_FILE
    from datus.core.settings import ClusterSettings, EvaluationSettings

    path = run_dir / CONFIG_FILE
    if not path.is_file():
        return {}
    try:
        with open_regular(path) as stream:
            saved = yaml.safe_load(stream.read().decode("utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise ConfigurationError(f"{path} is damaged ({error}); delete it to use the default settings") from error
    sections = {}
    for group, settings in (("cluster", ClusterSettings), ("eval", EvaluationSettings), ("crf", CRFParams)):
        section = saved.get(group) if isinstance(saved, dict) else None
        names = {item.name for item in dataclasses.fields(settings)}
        sections[group] = {key: value for key, value in (section or {}).items() if key in names}
    return sections


@contextmanager
def _missing_input_is_a_configuration_error() -> Iterator[None]:
    """A missing input folder is the user's to fix: its message names it, no traceback needed."""
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


def _prepare_parser() -> CommandParser:
    parser = CommandParser(
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
    from datus.commands.prepare import format_report, prepare_camvid, prepare_cityscapes, prepare_cocostuff27, prepare_suim

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


def _evaluate_parser() -> CommandParser:
    from datus.stages.crf import CRFParams
    from datus.core.settings import add_options

    parser = CommandParser(prog="datus evaluate", description="Hungarian-matched mIoU of any predicted label PNGs.")
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
    parser.add_argument("--output_dir", type=Path, required=True, help="folder for metrics.json, metrics.txt and confusion.png (created if missing)")
    parser.add_argument(
        "--crf",
        choices=["false", "true", "both"],
        default="false",
        help="refine each prediction with a dense CRF on its image before scoring (both: with and without); needs --images",
    )
    parser.add_argument("--images", type=Path, default=None, help="the images the predictions were made from (same relative paths)")
    parser.add_argument(
        "--label_confidence", type=float, default=0.8, help="CRF input: probability of each pixel's own label (default 0.8)"
    )
    parser.add_argument(
        "--protocol",
        choices=["all", "dense", "paper", "stego"],
        default="all",
        help="print only this protocol, with the numbers its peers publish (README: Evaluation protocols); "
        "metrics.json always holds all three",
    )
    add_options(parser, CRFParams, "crf", {})
    return parser


def run_evaluate(args: Sequence[str]) -> dict[str, Any]:
    from datus.stages.crf import CRFParams
    from datus.core.settings import from_options

    options = _evaluate_parser().parse_args(args)
    from datus.commands.evaluate import evaluate_folders
    from datus.stages.metrics import format_protocol, format_table

    crf = {"false": False, "true": True, "both": "both"}[options.crf]
    with _missing_input_is_a_configuration_error():
        metrics = evaluate_folders(
            options.pred,
            options.gt,
            options.num_classes,
            options.output_dir,
            ignore_index=options.ignore_index,
            num_clusters=options.num_clusters,
            images_dir=options.images,
            crf=crf,
            crf_params=CRFParams(**from_options(options, CRFParams, "crf")),
            label_confidence=options.label_confidence,
        )
    if options.protocol == "all":
        print(format_table(metrics, metrics["class_names"]))
    else:
        print(format_protocol(metrics, options.protocol, metrics["class_names"]))
    if metrics["classes_file"] is not None:
        print(f"classes from {metrics['classes_file']}")
    print(f"metrics written to {options.output_dir / 'metrics.json'}")
    return metrics


def _export_parser() -> CommandParser:
    parser = CommandParser(
        prog="datus export",
        description="Write a finished run's pseudo masks (and the original images) in a format training code reads. "
        "Streams the manifest: memory is bounded by one shard's row group or one image, whatever the size of the run.",
    )
    parser.add_argument("run", type=Path, help="the --output_dir of a finished datus predict run")
    parser.add_argument("out", type=Path, help="new or empty folder (or an earlier datus export of the same format)")
    parser.add_argument(
        "--format",
        required=True,
        choices=["hf", "webdataset", "folders"],
        help="hf: Parquet shards for datasets.load_dataset; webdataset: tars of jpg + seg.png + json; folders: "
        "images/ + masks/ + splits/ for mmsegmentation and detectron2",
    )
    parser.add_argument("--results", type=Path, default=None, help="masks of RUN/clusters/k<K> instead of the run folder's own")
    parser.add_argument("--val_fraction", type=float, default=0.1, help="share of images held out for validation (default 0.1)")
    parser.add_argument("--seed", type=int, default=0, help="decides the split; the same rule as PseudoMaskDataModule (default 0)")
    parser.add_argument("--ignore_noise", action="store_true", help="noise pixels (segments/<id>.png = 0) get --ignore_value")
    parser.add_argument("--ignore_value", type=int, default=255, help="mask value of noise pixels with --ignore_noise (default 255)")
    parser.add_argument(
        "--shard_size", type=float, default=None, help="bytes per Parquet file or tar (default 5e8 for hf, 1e9 for webdataset)"
    )
    parser.add_argument(
        "--link",
        choices=["hard", "copy"],
        default="hard",
        help="folders: hard-link the run's images and masks where the file system allows (else copy), or always copy",
    )
    return parser


def run_export(args: Sequence[str]) -> dict[str, Any]:
    options = _export_parser().parse_args(args)
    from datus.outputs.export import ExportSettings, export_run

    settings = ExportSettings(
        format=options.format,
        val_fraction=options.val_fraction,
        seed=options.seed,
        ignore_noise=options.ignore_noise,
        ignore_value=options.ignore_value,
        shard_size=_whole_bytes(options.shard_size),
        link=options.link,
    )
    with _missing_input_is_a_configuration_error():
        report = export_run(options.run, options.out, settings, options.results)
    images = report["images"]
    print(
        f"exported {images['train']} train + {images['val']} val images ({options.format}) to {options.out}; "
        f"{len(report['skipped'])} skipped (see {options.out / 'export.json'}); {options.out / 'README.md'} says how to load it"
    )
    suffixes = report["image_suffixes"]
    if options.format == "folders" and len(suffixes) > 1:
        counts = ", ".join(f"{count} .{suffix}" for suffix, count in suffixes.items())
        print(f"datus: warning: the images have several suffixes ({counts}); mmsegmentation and detectron2 take one "
              "per dataset, so convert them or register one dataset per suffix", file=sys.stderr)  # fmt: skip
    return report


def _whole_bytes(value: float | None) -> int | None:
    """``--shard_size`` as bytes; nan and infinity are a mistake, not a crash."""
    if value is None:
        return None
    if not math.isfinite(value):
        raise ConfigurationError(f"--shard_size {value}: give a number of bytes, e.g. 1e9")
    return int(value)


def main(args: Sequence[str] | None = None, process_starting: bool = False) -> None:
    """Entry point of the ``datus`` console script and ``python -m datus``.

    Returns nothing (a console script passes the return value to ``sys.exit``); every result
    is in the output folder. ``process_starting`` (the console script) lets ``predict`` start
    its Louvain worker before its imports, which a running process has done already.
    """
    arguments = list(sys.argv[1:] if args is None else args)
    _show_own_logs()
    if not arguments or arguments[0] in ("-h", "--help"):
        print(USAGE)
        return None
    if arguments[0] == "--version":
        print(f"datus {__version__}")
        return None
    command, rest = arguments[0], arguments[1:]
    if command == "predict":
        from datus.discovery.communities import worker_started_early
        from datus.commands.predict_options import check_arguments, help_text

        if any(argument in ("-h", "--help") for argument in rest):
            print(help_text(), end="")
            return None
        check_arguments(rest)

        with worker_started_early() if process_starting and not _only_prints(rest) else nullcontext():
            from datus.commands.predict import run_predict  # Lightning and timm: seconds of imports

            run_predict(rest)
    elif command == "cluster":
        run_cluster(rest)
    elif command == "evaluate":
        run_evaluate(rest)
    elif command == "prepare":
        run_prepare(rest)
    elif command == "export":
        run_export(rest)
    else:
        raise ConfigurationError(
            f"unknown command {command!r}; the commands are predict, cluster, evaluate, prepare, export (see datus --help)"
        )


def _only_prints(arguments: Sequence[str]) -> bool:
    """Whether ``predict`` will only print its help or configuration (no images, no Louvain)."""
    return any(argument in ("-h", "--help") or argument.startswith("--print_config") for argument in arguments)


def console_main(process_starting: bool = False) -> None:
    """Run a command; a mistake prints one line naming the fix, exit status 2.

    ``process_starting`` is for a process that starts in order to run this one command (the
    ``datus`` script, ``python -m datus``; see :func:`start`), never for a caller in a running
    process such as a test: ``predict`` then starts its Louvain worker during its imports, and
    after success the process exits without the interpreter's teardown.
    """
    if process_starting:
        global _command_pid
        _command_pid = os.getpid()
        for stop in STOP_SIGNALS:
            signal.signal(stop, _raise_interrupted)
    try:
        main(process_starting=process_starting)
    except ConfigurationError as error:
        print(f"datus: error: {one_line(str(error))}", file=sys.stderr)
        raise SystemExit(2) from None
    except OSError as error:
        from datus.runfolder.run import NOT_WRITABLE, OUT_OF_SPACE

        if error.errno not in NOT_WRITABLE | OUT_OF_SPACE:
            raise
        from datus.core.io import TEMPORARY_NAME

        fix = "free some space" if error.errno in OUT_OF_SPACE else "make it writable"
        where = str(error.filename or "")
        if TEMPORARY_NAME.fullmatch(os.path.basename(where)):  # name the folder, not datus's temporary
            where = os.path.dirname(where)
        where = f" in {where}" if where else ""
        print(
            f"datus: error: cannot write{one_line(where)}: {error.strerror}; {fix}, then rerun the same command to resume",
            file=sys.stderr,
        )
        raise SystemExit(1) from None
    except Interrupted as interrupted:
        name = signal.Signals(interrupted.signal_number).name
        print(f"datus: interrupted by {name}: rerun the same command to resume", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(128 + interrupted.signal_number)  # pools are shut down; skip a teardown that may wait on threads
    if process_starting:
        _exit_without_teardown()


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
"""What a user (Ctrl-C), ``kill``, ``docker stop`` and SLURM send to stop a job."""


class Interrupted(BaseException):
    """A stop signal arrived: unwinds like KeyboardInterrupt (every ``finally`` runs, pools stop),
    but is not one, so Lightning re-raises it instead of calling ``exit(1)``."""

    def __init__(self, signal_number: int) -> None:
        super().__init__(signal_number)
        self.signal_number = signal_number


_command_pid: int | None = None
"""The datus command's own process; forked children (data loader workers) inherit the handler, not the role."""


def _raise_interrupted(signal_number: int, frame: Any) -> None:
    if os.getpid() != _command_pid:  # a forked worker: behave as if no handler were set
        if signal_number == signal.SIGINT:
            raise KeyboardInterrupt  # torch's loader workers end quietly on it
        signal.signal(signal_number, signal.SIG_DFL)
        os.kill(os.getpid(), signal_number)
        return
    for stop in STOP_SIGNALS:  # a second signal while unwinding must not interrupt the clean-up
        signal.signal(stop, signal.SIG_IGN)
    raise Interrupted(signal_number)


def start() -> None:
    """The ``datus`` console script and ``python -m datus``."""
    from datus.core.workers import mark_command_process

    keep_freed_memory()
    mark_command_process()
    console_main(process_starting=True)


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
"""glibc's ``mallopt`` parameter numbers (malloc.h)."""
GLIBC_MMAP_THRESHOLD = 32 * 2**20
"""glibc's largest mmap threshold: blocks below it come from the heap, where they can be reused."""
GLIBC_TRIM_THRESHOLD = 256 * 2**20
"""Free memory at the top of the heap that glibc may keep instead of returning it to the system."""


def keep_freed_memory() -> None:
    """Have glibc reuse freed buffers instead of mapping fresh pages for every allocation.

    A forward pass on a CPU allocates and frees the same few-megabyte activations layer after
    layer. glibc's defaults serve many of them with fresh memory maps or trim them away, so each
    pass faults its pages in again: 300-700 k page faults and about 10 % of the CPU time for 96
    ViT-S/16 images, and the passes ran about 10 % faster without them. The cost is that the
    process keeps up to :data:`GLIBC_TRIM_THRESHOLD` of freed memory. Only for a process that datus
    starts (a library must not change its host's allocator), only with glibc, and not when the
    user set glibc's own ``MALLOC_*_THRESHOLD_`` variables.
    """
    try:
        libc_version = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (ValueError, OSError):
        return
    if not libc_version.startswith("glibc") or {"MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"} & set(os.environ):
        return
    import ctypes

    libc = ctypes.CDLL(None)
    libc.mallopt(M_MMAP_THRESHOLD, GLIBC_MMAP_THRESHOLD)
    libc.mallopt(M_TRIM_THRESHOLD, GLIBC_TRIM_THRESHOLD)


def _exit_without_teardown() -> NoReturn:
    """Exit 0 once the work is done, skipping the interpreter's teardown of its module graph.

    Freeing the thousands of modules and objects that torch, Lightning, timm and scikit-learn
    bring in takes 1-1.5 s after the last file is written. The exit handlers still run (logging
    flushes, child processes are joined) and the standard streams are flushed; every file datus
    writes is closed (and renamed into place) before its command returns.
    """
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
