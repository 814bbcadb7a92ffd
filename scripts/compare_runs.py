"""Agreement between the pseudo masks of two finished runs of the same images.

Reports the adjusted Rand index over all pixels of all shared images (label ids need not
match: ARI compares partitions) and each run's mIoU under both protocols, e.g. to decide
whether ``--model.embedding packed`` may replace the paper's crops for a dataset:

    python scripts/compare_runs.py runs/suim-crop runs/suim-packed
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics.cluster import contingency_matrix

from datus.core.io import read_label_png


def pooled_ari(run_a: Path, run_b: Path) -> tuple[float, int]:
    """ARI of the two runs' masks pooled over every image both have (one contingency table)."""
    masks_a = {p.relative_to(run_a / "masks"): p for p in (run_a / "masks").rglob("*.png")}
    shared = sorted(p for p in masks_a if (run_b / "masks" / p).is_file())
    if not shared:
        raise SystemExit(f"{run_a} and {run_b} have no mask in common")
    table: np.ndarray | None = None
    for relative in shared:
        a = read_label_png(masks_a[relative]).ravel()
        b = read_label_png(run_b / "masks" / relative).ravel()
        counts = contingency_matrix(a, b, sparse=False)
        rows, cols = np.unique(a), np.unique(b)
        size = max(int(rows.max()), int(cols.max())) + 1
        if table is None or table.shape[0] < size:
            grown = np.zeros((size, size), dtype=np.int64)
            if table is not None:
                grown[: table.shape[0], : table.shape[1]] = table
            table = grown
        table[np.ix_(rows, cols)] += counts
    assert table is not None
    return adjusted_rand_from_table(table), len(shared)


def adjusted_rand_from_table(table: np.ndarray) -> float:
    """Hubert-Arabie adjusted Rand index from a contingency table."""
    def pairs(x: np.ndarray) -> float:
        return float((x * (x - 1) / 2).sum())

    total = pairs(np.array([table.sum()]))
    index, rows, cols = pairs(table), pairs(table.sum(1)), pairs(table.sum(0))
    expected = rows * cols / total
    maximum = (rows + cols) / 2
    return 1.0 if maximum == expected else (index - expected) / (maximum - expected)


def miou(run: Path) -> dict[str, Any] | None:
    path = run / "metrics.json"
    if not path.is_file():
        return None
    return {name: p["miou"] for name, p in json.loads(path.read_text())["protocols"].items()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_a", type=Path)
    parser.add_argument("run_b", type=Path)
    options = parser.parse_args(argv)
    ari, images = pooled_ari(options.run_a, options.run_b)
    result = {"images": images, "adjusted_rand_index": round(ari, 4), "miou_a": miou(options.run_a), "miou_b": miou(options.run_b)}
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
