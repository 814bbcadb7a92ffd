"""A run killed at any moment and restarted with the same command ends as if never killed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from datus.commands.cli import main
from datus.core.io import read_label_png
from tests.generated import REPO, TINY, write_photos

pytestmark = pytest.mark.integration

NUM_IMAGES = 24


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_photos(tmp_path_factory.mktemp("kill-data"), NUM_IMAGES, (240, 320), "frame{index:02d}")


def arguments(images: Path, output_dir: Path) -> list[str]:
    return [
        "predict", "--config", TINY, "--data.root", str(images), "--output_dir", str(output_dir),
        "--data.batch_size", "1", "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def uninterrupted(images: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    output_dir = tmp_path_factory.mktemp("uninterrupted")
    main(arguments(images, output_dir))
    return output_dir


def start_run(images: Path, output_dir: Path, moment: Callable[[], bool]) -> subprocess.Popen[str]:
    """Start the CLI in its own process group and return once ``moment()`` is true."""
    environment = dict(os.environ, PYTHONPATH=str(REPO))
    process = subprocess.Popen(
        [sys.executable, "-m", "datus", *arguments(images, output_dir)],
        cwd=REPO, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 240
    while not moment():
        assert process.poll() is None, "the run ended before the moment to stop it came"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return process


def run_and_kill(images: Path, output_dir: Path, moment: Callable[[], bool]) -> list[int]:
    """Start the CLI in a process and SIGKILL it as soon as ``moment()`` is true; its child processes then."""
    process = start_run(images, output_dir, moment)
    children = _children(process.pid)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert not (output_dir / "summary.json").exists()  # it really died before finishing
    return children


def _children(pid: int) -> list[int]:
    """Child processes of ``pid`` (Louvain, loader and painting workers), from /proc."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children = (task / "children").read_text().split() if (task / "children").is_file() else []
        found += [int(child) for child in children]
    return found


def assert_same_results(run: Path, reference: Path) -> None:
    for index in range(NUM_IMAGES):
        for folder in ("segments", "masks"):
            name = f"{folder}/frame{index:02d}.png"
            assert np.array_equal(read_label_png(run / name), read_label_png(reference / name)), name
    for name in ("manifest.jsonl", "classes.json"):
        assert (run / name).read_text() == (reference / name).read_text()
    assert not list(run.rglob(".*.tmp*"))


def test_killed_during_prediction(images: Path, uninterrupted: Path, tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    run_and_kill(images, tmp_path, lambda: shards.is_dir() and len(list(shards.glob("rank*.npz"))) >= 3)
    done = len(list(shards.glob("rank*.npz")))  # complete shards; a half-written one starts with "."
    assert 3 <= done < NUM_IMAGES
    main(arguments(images, tmp_path))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["images_from_earlier_runs"] == done  # finished images were not predicted again
    assert summary["images_predicted_now"] == NUM_IMAGES - done
    assert_same_results(tmp_path, uninterrupted)


def test_killed_during_clustering(images: Path, uninterrupted: Path, tmp_path: Path) -> None:
    """The last shard is the writer's final act; what follows is stage 6, before any mask exists."""
    shards, masks = tmp_path / "shards", tmp_path / "masks"
    run_and_kill(images, tmp_path, lambda: shards.is_dir() and len(list(shards.glob("rank*.npz"))) == NUM_IMAGES)
    assert not (masks.is_dir() and any(masks.iterdir()))
    main(arguments(images, tmp_path))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["images_predicted_now"] == 0 and summary["images_from_earlier_runs"] == NUM_IMAGES
    assert_same_results(tmp_path, uninterrupted)


def test_killed_during_painting(images: Path, uninterrupted: Path, tmp_path: Path) -> None:
    """Painting runs in worker processes here (24 shards); they end with their killed parent."""
    masks = tmp_path / "masks"
    workers = run_and_kill(images, tmp_path, lambda: masks.is_dir() and any(masks.iterdir()))
    assert workers, "no painting worker was running when the run was killed"
    deadline = time.monotonic() + 10
    while any(process_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(process_alive(pid) for pid in workers)
    main(arguments(images, tmp_path))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["images_predicted_now"] == 0 and summary["images_from_earlier_runs"] == NUM_IMAGES
    assert_same_results(tmp_path, uninterrupted)


WORKER_PARENT = """
import os
import sys
import time

from datus.discovery import communities

if __name__ == "__main__":
    with communities.worker_started_early():
        print(communities._early_worker.submit(os.getpid).result(), flush=True)
        time.sleep(120)
"""


def test_a_louvain_worker_ends_with_its_killed_parent(tmp_path: Path) -> None:
    """A SIGKILLed datus cannot stop its pool; the worker notices on its own instead of idling for ever."""
    script = tmp_path / "parent.py"
    script.write_text(WORKER_PARENT)
    environment = dict(os.environ, PYTHONPATH=str(REPO))
    parent = subprocess.Popen([sys.executable, str(script)], env=environment, stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    worker = int(parent.stdout.readline())
    assert worker != parent.pid and process_alive(worker)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 10
    while process_alive(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not process_alive(worker)


def process_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for its new parent to reap it counts as ended)."""
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in state


@pytest.mark.parametrize(
    ("moment", "stop"), [("prediction", signal.SIGTERM), ("painting", signal.SIGTERM), ("prediction", signal.SIGINT)]
)
def test_a_stop_signal_ends_promptly_with_one_line_and_the_rerun_resumes(
    images: Path, uninterrupted: Path, tmp_path: Path, moment: str, stop: signal.Signals
) -> None:
    """``kill``, ``docker stop`` and SLURM send SIGTERM, Ctrl-C sends SIGINT to the whole process
    group (workers included): exit 128 + signal within seconds, one line, no traceback, no worker
    left behind, and the same command then finishes as if never stopped."""
    shards, masks = tmp_path / "shards", tmp_path / "masks"
    ready = {
        "prediction": lambda: shards.is_dir() and len(list(shards.glob("rank*.npz"))) >= 3,
        "painting": lambda: masks.is_dir() and any(masks.iterdir()),
    }[moment]
    process = start_run(images, tmp_path, ready)
    children = _children(process.pid)
    stopped_at = time.monotonic()
    if stop == signal.SIGINT:
        os.killpg(process.pid, stop)  # as a terminal's Ctrl-C: every process of the group
    else:
        process.send_signal(stop)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + stop, stderr[-2000:]
    assert time.monotonic() - stopped_at < 15
    assert "Traceback" not in stderr
    assert f"datus: interrupted by {stop.name}: rerun the same command to resume" in stderr
    deadline = time.monotonic() + 10
    while any(process_alive(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(process_alive(pid) for pid in children)
    main(arguments(images, tmp_path))
    assert_same_results(tmp_path, uninterrupted)
