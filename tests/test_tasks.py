"""Best-of-N candidate task: sizes, determinism, every candidate degraded, accuracy against the target."""
from __future__ import annotations

import numpy as np
import pandas as pd
from PIL import Image

from clipkit.evaluate.tasks import best_of_n_accuracy, best_of_n_task


def _table(tmp_path):
    rows, rng = [], np.random.default_rng(0)
    for label in ("fruit", "animal"):
        for i in range(5):  # a distinct coarse texture per image, so identity survives degradation
            path = tmp_path / f"{label}{i}.png"
            cells = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            Image.fromarray(cells).resize((64, 64), Image.Resampling.NEAREST).save(path)
            rows.append({"image": str(path), "caption": f"{label} {i}", "label": label})
    rows.append({"image": str(tmp_path / "fruit0.png"), "caption": "fruit 0 again", "label": "fruit"})
    return pd.DataFrame(rows)


def test_sets_are_deterministic_and_every_candidate_is_a_degraded_copy(tmp_path):
    table = _table(tmp_path)
    a = best_of_n_task(table, tmp_path / "a", n=4, num_prompts=6, seed=1)
    b = best_of_n_task(table, tmp_path / "b", n=4, num_prompts=6, seed=1)
    assert len(a) == 6 and all(len(s.candidates) == 4 for s in a)
    assert [s.prompt for s in a] == [s.prompt for s in b] and [s.target for s in a] == [s.target for s in b]
    for s in a:
        assert all(str(tmp_path / "a") in c for c in s.candidates)  # no clean original among the candidates
        own = np.asarray(Image.open(table.set_index("caption").loc[s.prompt, "image"]), np.float32)
        dists = [np.abs(np.asarray(Image.open(c), np.float32) - own).mean() for c in s.candidates]
        assert int(np.argmin(dists)) == s.target  # the target is the degraded copy of the prompt's own image


def test_accuracy_counts_the_target_at_rank_one(tmp_path):
    sets = best_of_n_task(_table(tmp_path), tmp_path / "t", n=4, num_prompts=4, seed=0)
    perfect = [[s.candidates[s.target]] + [c for i, c in enumerate(s.candidates) if i != s.target] for s in sets]
    wrong = [[c for i, c in enumerate(s.candidates) if i != s.target] + [s.candidates[s.target]] for s in sets]
    assert best_of_n_accuracy(perfect, sets)["best_of_n_top1"] == 1.0
    assert best_of_n_accuracy(wrong, sets) == {"best_of_n_top1": 0.0, "n_candidates": 4, "chance_best_of_n_top1": 0.25, "num_prompts": 4}
