"""Near-duplicates (issue 15): range search on real FAISS indexes against brute force, groups, result
deduplication, `clipkit dedup` and `clipkit index build --dedup` end to end."""
from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from clipkit.cli import main
from clipkit.search import SearchIndex
from clipkit.search import dedup

DIM = 64


def _planted(n: int = 300, seed: int = 0) -> tuple[np.ndarray, set[tuple[int, int]]]:
    """n random unit vectors (cosines near 0) with planted near-duplicates: a trio around row 10, a pair
    (20, 21) at ~0.97, and a chain 30~31~32 whose ends are below 0.95; returns vectors and the true pairs."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, DIM)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)

    def near(i: int, cos: float) -> np.ndarray:
        noise = rng.standard_normal(DIM).astype(np.float32)
        noise -= noise @ x[i] * x[i]
        return cos * x[i] + np.sqrt(1 - cos ** 2) * noise / np.linalg.norm(noise)
    x[11], x[12] = near(10, 0.99), near(10, 0.985)
    x[21] = near(20, 0.97)
    x[31] = near(30, 0.96)
    x[32] = near(31, 0.96)
    s = x @ x.T
    truth = {(a, b) for a, b in zip(*np.nonzero(np.triu(s, 1) >= 0.95))}
    assert {(10, 11), (10, 12), (11, 12), (20, 21), (30, 31), (31, 32)} <= truth and (30, 32) not in truth
    return x, truth


@pytest.fixture(scope="module")
def planted():
    return _planted()


@pytest.mark.parametrize("kind", ["flat", "IVF8,Flat", "HNSW16,Flat", "IVF8,PQ16x4fsr", "IVF8,SQ8"])
def test_pairs_match_brute_force(planted, kind):
    x, truth = planted
    index = SearchIndex.build(x, kind=kind)
    pairs = dedup.near_duplicate_pairs(index, 0.95)
    assert set(zip(pairs["a"], pairs["b"])) == truth
    assert (pairs["a"] < pairs["b"]).all()
    exact = np.einsum("nd,nd->n", x[pairs["a"]], x[pairs["b"]])
    assert pairs["similarity"].to_numpy() == pytest.approx(exact, abs=1e-5)  # exact cosines, also for PQ codes
    assert list(pairs["similarity"]) == sorted(pairs["similarity"], reverse=True)


def test_removed_rows_and_reconstructed_vectors(planted):
    x, _ = planted
    index = SearchIndex.build(x, kind="flat", keep_vectors=False)  # vectors reconstructed from the codes
    index.remove([11])
    got = set(zip(*dedup.near_duplicate_pairs(index, 0.95)[["a", "b"]].to_numpy().T))
    assert (10, 11) not in got and (11, 12) not in got and (10, 12) in got


def test_groups_keep_the_first_id(planted):
    x, _ = planted
    index = SearchIndex.build(x, kind="flat", metadata=pd.DataFrame({"caption": [f"c{i}" for i in range(len(x))],
                                                                      "id": np.arange(len(x))}))
    groups = dedup.duplicate_groups(dedup.near_duplicate_pairs(index, 0.95), index.metadata)
    members = {g: sorted(df["id"]) for g, df in groups.groupby("group")}
    assert sorted(members.values()) == [[10, 11, 12], [20, 21], [30, 31, 32]]  # the chain is one group
    assert sorted(groups.loc[groups["keep"], "id"]) == [10, 20, 30]
    assert list(groups.loc[groups["id"] == 21, "caption"]) == ["c21"]  # metadata beside each member
    report = dedup.remove_near_duplicates(index, 0.95)
    assert report == {"threshold": 0.95, "groups": 3, "removed": 5} and len(index) == len(x) - 5
    assert dedup.near_duplicate_pairs(index, 0.95).empty


def test_results_drop_near_duplicates_of_better_ones(planted):
    x, _ = planted
    index = SearchIndex.build(x, kind="flat")
    q = x[11] + 0.6 * x[20]  # close to the trio (cos ~0.85), then the pair (~0.5); the rest ~0 +- 0.13
    scores, ids = index.search(q, 8)
    assert {10, 11, 12, 20, 21} <= set(ids[0])
    kept_s, kept = dedup.drop_near_duplicates(index, scores, ids, 0.95)
    best_trio = next(i for i in ids[0] if i in (10, 11, 12))
    best_pair = next(i for i in ids[0] if i in (20, 21))
    assert set(kept[0]) == (set(ids[0]) - {10, 11, 12, 20, 21}) | {best_trio, best_pair}
    assert list(kept[0]) == [i for i in ids[0] if i in set(kept[0])]  # rank order kept
    assert kept_s[0] == pytest.approx(scores[0][np.isin(ids[0], kept[0])])


def test_bad_thresholds_and_too_many_pairs(planted, monkeypatch):
    index = SearchIndex.build(planted[0], kind="flat")
    for bad in (0, 1.5, True, "0.9"):
        with pytest.raises(ValueError, match=r"cosine similarity in \(0, 1\]"):
            dedup.near_duplicate_pairs(index, bad)
    monkeypatch.setattr(dedup, "MAX_PAIRS", 3)
    with pytest.raises(ValueError, match="raise the threshold"):
        dedup.near_duplicate_pairs(index, 0.95)


# ---------------------------------------------------------------- the CLI

def test_dedup_command_writes_the_table(planted, tmp_path, capsys):
    x, truth = planted
    SearchIndex.build(x, kind="flat", metadata=pd.DataFrame({"caption": [f"c{i}" for i in range(len(x))]})
                      ).save(tmp_path / "idx")
    assert main(["dedup", "--index", str(tmp_path / "idx"), "--out", str(tmp_path / "d.csv")]) == 0
    out = capsys.readouterr().out
    assert f"{len(truth)} near-duplicate pair(s) at cosine >= 0.95 in 3 group(s): 5 image(s)" in out
    table = pd.read_csv(tmp_path / "d.csv")
    assert list(table.columns) == ["group", "id", "keep", "similarity", "caption"] and len(table) == 8
    assert main(["dedup", "--index", str(tmp_path / "idx"), "--pairs", "--threshold", "0.98"]) == 0
    printed = capsys.readouterr().out
    assert "2 near-duplicate pair(s) at cosine >= 0.98 in 1 group(s)" in printed and "10 11 " in printed
    assert main(["dedup", "--index", str(tmp_path / "idx"), "--threshold", "2"]) == 2
    assert "cosine similarity in (0, 1]" in capsys.readouterr().err


def test_index_build_dedup_leaves_copies_out(tmp_path, saved_tiny_dir, capsys):
    """A folder with an exact copy and a re-encoded copy of one image: `embed --dedup` lists the group,
    `index build --dedup` tombstones both copies (the first id stays), the search never returns them, and the
    plain build keeps them."""
    rng = np.random.default_rng(0)
    (tmp_path / "imgs").mkdir()
    for i in range(8):
        base = rng.integers(0, 256, 3)
        Image.fromarray(np.clip(base + rng.integers(-40, 40, (64, 64, 3)), 0, 255).astype(np.uint8)).save(
            tmp_path / "imgs" / f"a{i}.png")
    shutil.copy(tmp_path / "imgs" / "a3.png", tmp_path / "imgs" / "b_copy.png")
    Image.open(tmp_path / "imgs" / "a3.png").save(tmp_path / "imgs" / "c_resaved.jpg", quality=95)
    emb = tmp_path / "emb"
    assert main(["embed", "--model", str(saved_tiny_dir), "--images", str(tmp_path / "imgs"), "--out", str(emb),
                 "--workers", "0", "--quiet", "--no-captions", "--dedup"]) == 0
    assert "dedup: 2 near-duplicate image(s) beyond the first of 1 group(s) at cosine >= 0.95" in capsys.readouterr().out
    table = pd.read_csv(emb / "duplicates.csv")
    assert sorted(table["image"].map(lambda p: p.rsplit("/", 1)[-1])) == ["a3.png", "b_copy.png", "c_resaved.jpg"]
    assert table.loc[table["keep"], "image"].str.endswith("a3.png").all()
    assert main(["embed", "--model", str(saved_tiny_dir), "--images", str(tmp_path / "imgs"), "--out",
                 str(tmp_path / "half"), "--workers", "0", "--quiet", "--shard", "0/2", "--shard-size", "5",
                 "--dedup"]) == 0  # one worker of two: the collection is not finished, so no table yet
    assert "dedup: not yet" in capsys.readouterr().out and not (tmp_path / "half" / "duplicates.csv").exists()
    assert main(["index", "build", "--embeddings", str(emb), "--out", str(tmp_path / "plain"), "--quiet"]) == 0
    assert main(["index", "build", "--embeddings", str(emb), "--out", str(tmp_path / "dd"), "--quiet",
                 "--dedup"]) == 0
    assert "2 near-duplicate(s) left out, 1 group(s) at cosine >= 0.95" in capsys.readouterr().out
    plain, dd = SearchIndex.load(tmp_path / "plain"), SearchIndex.load(tmp_path / "dd")
    names = plain.metadata["image"].map(lambda p: p.rsplit("/", 1)[-1]).tolist()
    copies = [names.index("b_copy.png"), names.index("c_resaved.jpg")]
    assert len(plain) == 10 and len(dd) == 8 and dd.deleted[copies].all()
    query = np.asarray(plain.vectors[names.index("a3.png")])
    assert set(copies) <= set(plain.search(query, 3)[1][0])
    assert not set(copies) & set(dd.search(query, 10)[1][0])
    assert dd.build_report["dedup"] == {"threshold": 0.95, "groups": 1, "removed": 2}
