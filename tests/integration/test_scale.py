"""The dataset stages at scale: worker processes, one pass, cheap reruns, sweeps, ranks streaming their share.

Speed and memory are measured by scripts/benchmark_scale.py, never here; these tests check the
mechanisms that make them hold: the same bytes from any number of workers, no shard body read
on a rerun with nothing changed, and a fit whose ranks each read only their own rows.
"""

from __future__ import annotations

import datetime
import json
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import datus.stages.postprocess
from datus.commands.cli import main
from datus.stages.clustering import ClusterModel, Rows, fit_rows
from datus.runfolder.records import ImageRecord
from datus.runfolder.run import Run
from datus.core.settings import ClusterSettings
from datus.runfolder.shards import segment_table, write_shard

pytestmark = pytest.mark.integration


def _copy(run: Path, destination: Path) -> Path:
    shutil.copytree(run, destination)
    return destination


def _files(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def test_workers_paint_the_same_bytes_as_one_process(finished_run: Path, tmp_path: Path) -> None:
    """Masks, colours, overlays, galleries, report, metrics and manifest: byte for byte, 1 or 2 workers."""
    outputs = {}
    for workers in (1, 2):
        run = _copy(finished_run, tmp_path / f"workers{workers}" / "run")  # the report's title names the folder
        main(["cluster", "--run", str(run), "--cluster.num_clusters", "4", "--cluster.workers", str(workers)])
        files = _files(run / "clusters" / "k4")
        files.pop("summary.json")  # stage seconds
        files.pop("painted.json")  # the folders' fingerprints hold the files' modification times
        outputs[workers] = files
    assert outputs[1].keys() == outputs[2].keys()
    assert any(name.startswith("masks/") for name in outputs[1]) and any(name.startswith("overlay/") for name in outputs[1])
    different = [name for name in outputs[1] if outputs[1][name] != outputs[2][name]]
    assert not different


def test_a_rerun_with_nothing_changed_reads_no_shard_body_and_opens_no_image(
    finished_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = _copy(finished_run, tmp_path / "run")
    main(["cluster", "--run", str(run), "--cluster.num_clusters", "3"])
    before = _files(run / "clusters" / "k3")

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a rerun with nothing changed read a shard body or opened an image")

    targets = ("datus.stages.shard_pass.read_records", "datus.stages.fit.segment_table", "datus.stages.paint.Image.open", "datus.core.io.Image.open")
    for target in (*targets, "datus.outputs.html_view.write_pages"):  # the HTML pages too: no manifest read
        monkeypatch.setattr(target, refuse)
    main(["cluster", "--run", str(run), "--cluster.num_clusters", "3"])
    after = _files(run / "clusters" / "k3")
    assert {name: data for name, data in after.items() if name != "summary.json"} == {
        name: data for name, data in before.items() if name != "summary.json"
    }


def test_a_deleted_mask_is_painted_again_on_rerun(finished_run: Path, tmp_path: Path) -> None:
    run = _copy(finished_run, tmp_path / "run")
    main(["cluster", "--run", str(run), "--cluster.num_clusters", "3"])
    mask = sorted((run / "clusters" / "k3" / "masks").rglob("*.png"))[0]
    expected = mask.read_bytes()
    mask.unlink()
    main(["cluster", "--run", str(run), "--cluster.num_clusters", "3"])
    assert mask.read_bytes() == expected


def test_a_sweep_writes_only_what_depends_on_k(finished_run: Path, tmp_path: Path) -> None:
    """Segment maps stay in the run folder; --score_only writes no per-image file at all."""
    run = _copy(finished_run, tmp_path / "run")
    main(["cluster", "--run", str(run), "--cluster.num_clusters", "2", "3", "--score_only"])
    rows = json.loads((run / "clusters" / "summary.json").read_text())["rows"]
    assert [row["k"] for row in rows] == [2, 3] and all(row["dense_miou"] is not None for row in rows)
    for k in (2, 3):
        folder = run / "clusters" / f"k{k}"
        assert (folder / "metrics.json").is_file() and (folder / "summary.json").is_file()
        assert not any((folder / name).exists() for name in ("masks", "segments", "color", "overlay", "gallery"))
    main(["cluster", "--run", str(run), "--cluster.num_clusters", "3"])
    assert (run / "clusters" / "k3" / "masks").is_dir() and not (run / "clusters" / "k3" / "segments").exists()


NUM_SHARDS = 4
PER_SHARD = 6


def _synthetic_run(root: Path) -> Run:
    """Four shards of records with 12-d fp16 embeddings around four centres."""
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(4, 12))
    run = Run(root)
    for shard in range(NUM_SHARDS):
        records = []
        for index in range(PER_SHARD):
            grid = np.repeat(np.arange(4, dtype=np.int32), 16).reshape(8, 8)
            points = centres[rng.integers(0, 4, 4)] + 0.3 * rng.normal(size=(4, 12))
            points = (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(np.float16)
            records.append(
                ImageRecord(
                    image_id=f"s{shard}i{index}", image_path="unused.jpg", mask_path="", orig_size=(16, 16),
                    segment_map=grid, sizes=np.full(4, 16, np.int32), is_noise=np.zeros(4, bool),
                    donors=np.arange(4, dtype=np.int32), embeddings=points, image_embedding=points[0],
                    cls_attention=np.zeros((8, 8), np.float16),
                )
            )  # fmt: skip
        write_shard(run.shard_path(shard % 2, shard // 2), records)
    return run


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _rank(rank: int, port: int, root: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60)
    )
    try:
        run = Run(root)
        own = run.shards()[rank::2]
        table = segment_table(own, root / "cache", f"rank{rank:03d}")
        (root / f"rows{rank}.txt").write_text(str(len(table.keys)))
        model = fit_rows(Rows(table.embeddings, table.keys, torch.device("cpu")), ClusterSettings(num_clusters=4, engine="torch"))
        model.save(root / f"model{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="this torch build has no torch.distributed")
def test_two_ranks_each_stream_their_own_rows_and_fit_what_one_process_fits(tmp_path: Path) -> None:
    """Each rank's table holds only its shards' segments; the model is bit-identical to one process's
    (keyed sample, exact float64 sums of fp16 rows)."""
    run = _synthetic_run(tmp_path)
    mp.spawn(_rank, args=(_free_port(), tmp_path), nprocs=2, join=True)
    assert [int((tmp_path / f"rows{rank}.txt").read_text()) for rank in range(2)] == [2 * PER_SHARD * 4] * 2
    single_table = segment_table(run.shards(), tmp_path / "cache", "all")
    single = fit_rows(Rows(single_table.embeddings, single_table.keys, torch.device("cpu")), ClusterSettings(num_clusters=4, engine="torch"))
    for rank in range(2):
        np.testing.assert_array_equal(ClusterModel.load(tmp_path / f"model{rank}").centroids, single.centroids)


def test_a_stored_segment_table_is_checked_not_trusted(tmp_path: Path) -> None:
    run = _synthetic_run(tmp_path)
    expected = np.array(segment_table(run.shards(), tmp_path / "cache", "all").embeddings)
    stored = sorted((tmp_path / "cache").glob("segments-*.npy"))
    assert len(stored) == 1 and len(expected) == NUM_SHARDS * PER_SHARD * 4
    np.save(stored[0], np.zeros((3, 12), np.float16))  # truncated by someone
    np.testing.assert_array_equal(np.asarray(segment_table(run.shards(), tmp_path / "cache", "all").embeddings), expected)


def test_auto_workers_do_not_spawn_for_a_short_run_or_from_a_script(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datus.stages.postprocess, "available_cores", lambda: 8)
    assert datus.stages.postprocess.auto_workers(1000, 1) == 1  # in-process: a script may not be safe to re-import
    monkeypatch.setattr(datus.stages.postprocess, "spawns_by_default", lambda: True)
    assert datus.stages.postprocess.auto_workers(3, 1) == 1
    assert datus.stages.postprocess.auto_workers(40, 1) == 5
    assert datus.stages.postprocess.auto_workers(1000, 2) == 4


def test_a_mask_copied_in_from_another_clustering_is_painted_again(finished_run: Path, tmp_path: Path) -> None:
    """Same name, same size, a valid label map: only the mask's note says it was painted from another fit."""
    run = _copy(finished_run, tmp_path / "run")
    main(["cluster", "--run", str(run), "--cluster.num_clusters", "2"])
    main(["cluster", "--run", str(run), "--cluster.num_clusters", "3"])
    name = sorted(path.relative_to(run / "clusters" / "k3" / "masks") for path in (run / "clusters" / "k3" / "masks").rglob("*.png"))[0]
    own = (run / "clusters" / "k3" / "masks" / name).read_bytes()
    shutil.copyfile(run / "clusters" / "k2" / "masks" / name, run / "clusters" / "k3" / "masks" / name)
    main(["cluster", "--run", str(run), "--cluster.num_clusters", "3"])
    assert (run / "clusters" / "k3" / "masks" / name).read_bytes() == own


def test_a_table_left_by_an_earlier_process_is_never_trusted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Same shape, same size, other values (tampered, or written by another version): rebuilt."""
    import datus.runfolder.shards

    run = _synthetic_run(tmp_path)
    expected = np.array(segment_table(run.shards(), tmp_path / "cache", "all").embeddings)
    stored = sorted((tmp_path / "cache").glob("segments-*.npy"))[0]
    np.save(stored, np.zeros_like(expected))
    monkeypatch.setattr(datus.runfolder.shards, "_WRITTEN", {})  # a new process
    np.testing.assert_array_equal(np.asarray(segment_table(run.shards(), tmp_path / "cache", "all").embeddings), expected)


@pytest.mark.parametrize("name", ["stability.json", "painted.json", "settings.json"])
def test_a_run_file_nested_too_deep_is_damaged_not_a_crash(finished_run: Path, tmp_path: Path, name: str) -> None:
    run = _copy(finished_run, tmp_path / "run")
    main(["cluster", "--run", str(run), "--cluster.num_clusters", "3"])
    (run / "clusters" / "k3" / ("painted.json" if name == "painted.json" else f"fit/{name}")).write_text("[" * 200000 + "]" * 200000)
    main(["cluster", "--run", str(run), "--cluster.num_clusters", "3"])  # refitted or repainted, no RecursionError
    assert json.loads((run / "clusters" / "k3" / "summary.json").read_text())["num_clusters"] == 3
