"""scripts/compare_runs.py: pooled ARI equals scikit-learn's on the concatenated masks."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import adjusted_rand_score

from tests.generated import REPO

pytestmark = pytest.mark.integration

spec = importlib.util.spec_from_file_location("compare_runs", REPO / "scripts" / "compare_runs.py")
compare_runs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare_runs)  # type: ignore[union-attr]


def test_pooled_ari_matches_sklearn_and_ignores_label_names(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    a_all, b_all = [], []
    for index, shape in enumerate([(6, 7), (5, 9), (8, 4)]):
        a = rng.integers(0, 4, shape).astype(np.uint8)
        b = np.where(rng.random(shape) < 0.8, (a + 1) % 4, rng.integers(0, 4, shape)).astype(np.uint8)
        for run, mask in (("a", a), ("b", b)):
            (tmp_path / run / "masks" / "sub").mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask).save(tmp_path / run / "masks" / "sub" / f"{index}.png")
        a_all.append(a.ravel())
        b_all.append(b.ravel())
    ari, images = compare_runs.pooled_ari(tmp_path / "a", tmp_path / "b")
    assert images == 3
    assert abs(ari - adjusted_rand_score(np.concatenate(a_all), np.concatenate(b_all))) < 1e-12
    same, _ = compare_runs.pooled_ari(tmp_path / "a", tmp_path / "a")
    assert same == 1.0
