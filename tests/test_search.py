"""clipkit.search on real FAISS indexes over seeded clustered vectors (RELIABILITY cases 28-30)."""
from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import faiss
import numpy as np
import pandas as pd
import pytest

from clipkit.errors import IndexLoadError
from helpers import run_script
from clipkit.search.build import choose_factory, resolve_factory
from clipkit.search.exact import drop_self, exact_search, exact_search_blocks, recall_at_k
from clipkit.search.index import EXACT_FILTER_MAX, SearchIndex

N, D = 20_000, 64
KINDS = ["flat", "hnsw", "ivf", "ivfpq", "auto", "IVF64,SQ8", "PCA32,IVF64,Flat"]


@pytest.fixture(scope="module", autouse=True)
def one_faiss_thread():
    """One OpenMP thread: on a busy 2-core box FAISS's spinning threads make builds 5-10x slower."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def data() -> dict:
    """200 clusters; `style` is a per-cluster label, so filtering on it is correlated with the index."""
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((200, D))
    label = rng.integers(0, 200, N)
    x = unit(centers[label] + 0.35 * rng.standard_normal((N, D)))
    q = unit(x[rng.choice(N, 200, replace=False)] + 0.1 * rng.standard_normal((200, D)))
    meta = pd.DataFrame({"style": np.where(label % 3 == 0, "noto", "openmoji"), "label": label,
                         "name": [f"emoji_{i}" for i in range(N)]})
    return {"x": x, "q": q, "meta": meta, "label": label, "truth": exact_search(x, q, 10)[1]}


@pytest.fixture(scope="module")
def built(data) -> dict:
    cache: dict = {}

    def get(kind: str) -> SearchIndex:
        if kind not in cache:
            cache[kind] = SearchIndex.build(data["x"], data["meta"], kind=kind, train_sample=20_000)
        return cache[kind]
    return get


def small_index(kind: str = "flat", n: int = 1000, d: int = 16, seed: int = 1) -> SearchIndex:
    x = unit(np.random.default_rng(seed).standard_normal((n, d)))
    meta = pd.DataFrame({"name": [f"r{i}" for i in range(n)], "group": np.arange(n) % 5})
    return SearchIndex.build(x, meta, kind=kind)


# ---- factory rule -------------------------------------------------------------------------------

@pytest.mark.parametrize("n,d,budget,want", [
    (1_000, 512, None, "Flat"),
    (49_999, 64, None, "Flat"),
    (50_000, 64, None, "HNSW32"),
    (200_000, 512, 200_000 * (4 * 512 + 16), "IVF1788,Flat"),  # HNSW graph does not fit, vectors do
    (200_000, 512, 200_000 * 40, "IVF1788,PQ32x4fsr"),  # full vectors do not fit: PQ shrunk to fit
    (2_000_000, 512, 2_000_000 * (4 * 512 + 16), "IVF5656,Flat"),  # full vectors fit: near-exact IVF
    (2_000_000, 512, 2_000_000 * 100, "IVF5656,PQ128x4fsr"),
    (20_000, 64, 20_000 * 400, "Flat"),
])
def test_choose_factory_rule(n, d, budget, want):
    assert choose_factory(n, d, budget) == want


def test_auto_budget_defaults_to_half_of_memory(monkeypatch):
    import clipkit.search.build as build

    monkeypatch.setattr(build, "default_memory_budget", lambda: 2_000_000 * 100)
    assert choose_factory(2_000_000, 512) == "IVF5656,PQ128x4fsr"
    monkeypatch.setattr(build, "default_memory_budget", lambda: 1 << 40)
    assert choose_factory(2_000_000, 512) == "IVF5656,Flat"


def test_kind_names_and_raw_strings():
    assert resolve_factory("flat", 10, 8) == "Flat"
    assert resolve_factory("hnsw", 10, 8) == "HNSW32"
    assert resolve_factory("ivf", 20_000, 64) == "IVF512,Flat"  # 4*sqrt(n)=565 clamped to n/39
    assert resolve_factory("ivf", 10, 64) == "IVF1,Flat"
    assert resolve_factory("ivfpq", 20_000, 64) == "IVF512,PQ16x4fsr"
    assert resolve_factory("IVF7,SQ8", 10, 8) == "IVF7,SQ8"
    with pytest.raises(ValueError, match="memory budget"):
        choose_factory(20_000, 64, 20_000 * 10)
    with pytest.raises(ValueError, match="invalid FAISS factory"):
        SearchIndex.build(unit(np.ones((4, 8)) + np.eye(4, 8)), kind="NotAnIndex")


# ---- build, search, round trip ------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_round_trips(kind, built, data, tmp_path):
    ix = built(kind)
    report = ix.build_report
    assert report["factory"] == ix.factory and report["eval_queries"] == 200 and report["bytes_per_vector"] > 0
    assert report["recall@10"] >= (0.95 if kind in ("flat", "hnsw", "ivf", "auto") else 0.2)
    scores, ids = ix.search(data["q"], 10)
    assert scores.dtype == np.float32 and ids.dtype == np.int64 and ids.shape == (200, 10)
    assert (ids >= 0).all() and (np.diff(scores, axis=1) <= 1e-6).all()
    ix.save(tmp_path / "idx")
    info = json.loads((tmp_path / "idx" / "index.json").read_text())
    assert info["factory"] == ix.factory and info["dim"] == D and info["count"] == N and info["metric"] == "ip"
    back = SearchIndex.load(tmp_path / "idx", expected_dim=D)
    assert isinstance(back.vectors, np.memmap) and back.build_report == ix.build_report
    s2, i2 = back.search(data["q"], 10)
    np.testing.assert_array_equal(i2, ids)
    np.testing.assert_array_equal(s2, scores)
    np.testing.assert_array_equal(back.search(data["q"], 10, rerank=4)[1], ix.search(data["q"], 10, rerank=4)[1])


def test_flat_equals_numpy_brute_force(built, data):
    scores, ids = built("flat").search(data["q"], 10)
    sims = data["q"].astype(np.float64) @ data["x"].T.astype(np.float64)
    want = np.argsort(-sims, axis=1)[:, :10]
    np.testing.assert_array_equal(ids, want)
    np.testing.assert_allclose(scores, np.take_along_axis(sims, want, 1), atol=1e-5)


def test_ivfpq_rerank_recovers_recall(built, data):
    ix = built("ivfpq")
    plain = recall_at_k(ix.search(data["q"], 10)[1], data["truth"], 10)
    reranked = recall_at_k(ix.search(data["q"], 10, rerank=10)[1], data["truth"], 10)
    assert plain < 0.95 <= reranked, (plain, reranked)
    assert ix.build_report["recall@10_rerank10"] >= 0.95 > ix.build_report["recall@10"]


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_approximate_kinds_reach_good_recall(kind, built, data):
    ix = built(kind)
    assert recall_at_k(ix.search(data["q"], 10)[1], data["truth"], 10) >= 0.95
    # k=100 > efSearch: FAISS HNSW would return a padded-out 16-wide beam unless efSearch >= k
    truth100 = exact_search(data["x"], data["q"], 100)[1]
    assert recall_at_k(ix.search(data["q"], 100, **({"ef_search": 16} if kind == "hnsw" else {}))[1],
                       truth100, 100) >= 0.9


def test_exact_search_and_recall_helpers():
    x = unit(np.random.default_rng(3).standard_normal((5, 4)))
    scores, ids = exact_search(x, x, 7)
    assert ids[:, 0].tolist() == list(range(5)) and (ids[:, 5:] == -1).all() and np.isneginf(scores[:, 5:]).all()
    assert recall_at_k(ids, ids, 5) == 1.0
    assert recall_at_k(np.array([[0, 9, -1]]), np.array([[0, 1, 2]]), 3) == pytest.approx(1 / 3)
    assert drop_self(np.array([[4, 2, 7], [1, 3, 5]]), np.array([2, 9]), 2).tolist() == [[4, 7], [1, 3]]


def test_exact_search_over_blocks_equals_one_search():
    """Blocks smaller than k, an empty block and the blocks' own ids: the same top-k as one exact search."""
    x = unit(np.random.default_rng(6).standard_normal((300, 8)))
    q = unit(np.random.default_rng(7).standard_normal((5, 8)))
    ids = np.arange(300) * 10 + 3  # ids that are not positions
    cuts = [0, 3, 3, 120, 300]
    blocks = [(x[lo:hi], ids[lo:hi]) for lo, hi in zip(cuts, cuts[1:])]
    scores, found = exact_search_blocks(iter(blocks), q, 12)
    want_scores, want_pos = exact_search(x, q, 12)
    np.testing.assert_array_equal(found, ids[want_pos])
    np.testing.assert_allclose(scores, want_scores, atol=1e-6)
    scores, found = exact_search_blocks(blocks[:2], q, 5)  # only 3 rows: padded with -1 / -inf
    assert (found[:, 3:] == -1).all() and np.isneginf(scores[:, 3:]).all() and set(found[0, :3]) == {3, 13, 23}


def test_per_call_parameters_do_not_leak_between_threads(built, data):
    ix, q = built("ivf"), data["q"][:50]
    want = {p: ix.search(q, 10, nprobe=p)[1] for p in (1, 64)}
    assert not np.array_equal(want[1], want[64])
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda p: (p, ix.search(q, 10, nprobe=p)[1]), [1, 64] * 8))
    for p, ids in got:
        np.testing.assert_array_equal(ids, want[p])


# ---- filters ------------------------------------------------------------------------------------

def filtered_truth(data, mask: np.ndarray, k: int = 10) -> np.ndarray:
    allowed = np.flatnonzero(mask)
    return allowed[exact_search(data["x"][allowed], data["q"], k)[1]]


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf", "ivfpq"])
def test_filter_returns_only_matching_rows(kind, built, data):
    ix, meta = built(kind), data["meta"]
    noto = (meta["style"] == "noto").to_numpy()
    assert noto.sum() > EXACT_FILTER_MAX  # the FAISS IDSelector path, correlated with the clusters
    _, ids = ix.search(data["q"], 10, filter='style == "noto"', rerank=10)
    assert (ids >= 0).all() and noto[ids].all()
    assert recall_at_k(ids, filtered_truth(data, noto), 10) >= (0.9 if kind == "hnsw" else 0.95)
    np.testing.assert_array_equal(ix.search(data["q"], 10, filter={"style": "noto"}, rerank=10)[1], ids)
    np.testing.assert_array_equal(ix.search(data["q"], 10, filter=noto, rerank=10)[1], ids)
    small = (meta["label"] == 3).to_numpy()  # ~100 rows: searched exactly
    _, ids = ix.search(data["q"], 10, filter="label == 3 and name != 'x'")
    np.testing.assert_array_equal(ids, filtered_truth(data, small))
    hits = ix.results(*ix.search(data["q"][:3], 5, filter=np.flatnonzero(small)))
    assert all(h["label"] == 3 and h["style"] == meta["style"][h["id"]] for row in hits for h in row)


def test_filter_edge_cases(built, data):
    ix = built("ivf")
    scores, ids = ix.search(data["q"][:2], 5, filter="label == -7")
    assert (ids == -1).all() and np.isneginf(scores).all() and ix.results(scores, ids) == [[], []]
    for bad in ["no_such_column == 1", "label +", "label"]:
        with pytest.raises(ValueError, match="filter"):
            ix.search(data["q"][:1], 5, filter=bad)
    with pytest.raises(ValueError, match="filter column"):
        ix.search(data["q"][:1], 5, filter={"nope": 1})
    with pytest.raises(ValueError, match="filter ids"):
        ix.search(data["q"][:1], 5, filter=[N + 5])
    with pytest.raises(ValueError, match="mask"):
        ix.search(data["q"][:1], 5, filter=np.ones(3, bool))


# ---- MMR ----------------------------------------------------------------------------------------

def test_mmr_is_more_diverse_on_near_duplicates():
    rng = np.random.default_rng(5)
    base = unit(rng.standard_normal((300, 32)))
    x = unit(np.repeat(base, 5, axis=0) + 0.01 * rng.standard_normal((1500, 32)))  # 5 copies each
    group = np.repeat(np.arange(300), 5)
    ix = SearchIndex.build(x, pd.DataFrame({"group": group}), kind="flat")
    q = unit(base[:20] + 0.3 * rng.standard_normal((20, 32)))
    _, plain = ix.search(q, 10)
    mmr_scores, mmr = ix.search(q, 10, mmr=0.5)
    assert all(len(set(row)) == 10 for row in mmr) and (mmr >= 0).all()
    groups = lambda ids: np.mean([len(set(group[row])) for row in ids])  # noqa: E731
    assert groups(mmr) >= groups(plain) + 3, (groups(mmr), groups(plain))
    mean_sim = lambda ids: np.mean([(x[r] @ x[r].T)[np.triu_indices(10, 1)].mean() for r in ids])  # noqa: E731
    assert mean_sim(mmr) < mean_sim(plain)
    np.testing.assert_allclose(mmr_scores, np.einsum("qkd,qd->qk", x[mmr], q), atol=1e-5)
    np.testing.assert_array_equal(ix.search(q, 10, mmr=1.0)[1], plain)


# ---- add / remove -------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_add_remove_survive_save_load(kind, tmp_path):
    ix = small_index(kind, n=3000)
    q = ix.vectors[:5].copy()
    gone = np.unique(ix.search(q, 3)[1])
    assert ix.remove(gone) == gone.size and ix.remove(gone) == 0
    new = unit(q + 0.001)
    new_ids = ix.add(new, pd.DataFrame({"name": [f"new{i}" for i in range(5)], "group": 9}))
    assert new_ids.tolist() == list(range(3000, 3005)) and len(ix) == 3000 - gone.size + 5
    ix.save(tmp_path / "idx")
    back = SearchIndex.load(tmp_path / "idx")
    for cur in (ix, back):
        scores, ids = cur.search(q, 20)  # exact codes: each score must be that id's own vector's score
        np.testing.assert_allclose(scores, np.einsum("qkd,qd->qk", cur.vectors[ids], q), atol=1e-5)
        scores, ids = cur.search(q, 20, rerank=2)
        assert not np.isin(ids, gone).any() and (ids[:, 0] == new_ids).all()
        assert not np.isin(cur.search(q, 20, filter="group == 0")[1], gone).any()
        assert cur.results(scores[:1], ids[:1])[0][0]["name"] == "new0"
    np.testing.assert_array_equal(back.search(q, 20)[1], ix.search(q, 20)[1])
    assert len(back) == len(ix) and back.deleted.sum() == gone.size
    back.remove(new_ids[:1])  # a loaded (memory-mapped) index stays editable
    assert back.add(q[:1]).tolist() == [3005] and back.search(q[:1], 1)[1][0, 0] == 3005
    back.save(tmp_path / "idx")
    assert len(SearchIndex.load(tmp_path / "idx")) == len(ix)


def test_remove_everything_gives_empty_results():
    ix = small_index("flat", n=50)
    ix.remove(np.arange(50))
    scores, ids = ix.search(ix.vectors[:2], 5)
    assert (ids == -1).all() and ix.results(scores, ids) == [[], []]
    with pytest.raises(ValueError, match="ids to remove"):
        ix.remove([50])


# ---- search edge cases (case 30) ----------------------------------------------------------------

def test_empty_index_and_k_beyond_ntotal():
    empty = SearchIndex.build(np.zeros((0, 8), np.float32))
    scores, ids = empty.search(np.ones(8), 3)
    assert ids.shape == (1, 3) and (ids == -1).all() and empty.results(scores, ids) == [[]]
    ix = small_index("flat", n=4, d=8)
    scores, ids = ix.search(ix.vectors[:2], 10)
    assert ids.shape == (2, 10) and (ids[:, 4:] == -1).all() and np.isneginf(scores[:, 4:]).all()
    res = ix.results(scores, ids)
    assert [len(r) for r in res] == [4, 4] and all(h["id"] >= 0 for r in res for h in r)
    assert res[0][0]["name"] == "r0"  # never meta[-1] (the last row)


def test_no_metadata_and_empty_indexes_round_trip(tmp_path):
    x = unit(np.random.default_rng(4).standard_normal((30, 8)))
    for name, ix in {"plain": SearchIndex.build(x, model_id="m1"), "empty": SearchIndex.build(x[:0])}.items():
        ix.save(tmp_path / name)
        back = SearchIndex.load(tmp_path / name, expected_dim=8)
        assert len(back) == len(ix) and back.model_id == ix.model_id and list(back.metadata.columns) == []
        assert back.results(*back.search(x[:1], 3)) == ix.results(*ix.search(x[:1], 3))


@pytest.mark.parametrize("query,match", [
    (np.full(16, np.nan), "NaN or inf"),
    (np.r_[np.inf, np.zeros(15)], "NaN or inf"),
    (np.zeros(16), "zero"),
    (np.ones(15), "dim 15"),
    (np.ones((1, 2, 16)), "1-D"),
    (np.array(["a"] * 16), "real"),
])
def test_bad_queries_raise_value_error(query, match):
    with pytest.raises(ValueError, match=match):
        small_index().search(query, 5)


@pytest.mark.parametrize("kwargs,match", [
    ({"k": 0}, "k must be"), ({"k": 10_001}, "k must be"), ({"k": 2.5}, "k must be"), ({"k": True}, "k must be"),
    ({"nprobe": 4}, "IVF"), ({"ef_search": 4}, "HNSW"), ({"rerank": -1}, "rerank"), ({"mmr": 1.5}, "mmr"),
])
def test_bad_arguments_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        small_index().search(np.ones(16), **{"k": 5, **kwargs})


def test_float64_and_1d_queries_and_missing_vectors():
    ix = small_index()
    q = ix.vectors[:3].astype(np.float64) * 7.0  # not unit length: normalised before search
    s64, i64 = ix.search(q, 5)
    s32, i32 = ix.search(ix.vectors[:3], 5)
    np.testing.assert_array_equal(i64, i32)
    np.testing.assert_allclose(s64, s32, atol=1e-6)
    assert ix.search(ix.vectors[0], 5)[1].shape == (1, 5)
    lean = SearchIndex.build(ix.vectors, keep_vectors=False)
    with pytest.raises(ValueError, match="keep_vectors"):
        lean.search(ix.vectors[0], 5, rerank=2)


def test_results_are_json_safe():
    x = unit(np.random.default_rng(2).standard_normal((4, 8)))
    meta = pd.DataFrame({"f": [0.5, np.nan, 1.0, 2.0], "i": np.arange(4, dtype=np.int64), "s": ["a", None, "c", "d"],
                         "t": pd.to_datetime(["2024-01-01"] * 4), "id": ["shadowed"] * 4})
    ix = SearchIndex.build(x, meta)
    res = ix.results(*ix.search(x, 4))
    text = json.dumps(res, allow_nan=False)
    hit = next(h for h in res[1] if h["id"] == 1)
    assert hit["f"] is None and hit["s"] is None and isinstance(hit["i"], int) and "2024-01-01" in text


def test_bad_build_inputs():
    with pytest.raises(ValueError, match="zero vectors"):
        SearchIndex.build(np.zeros((3, 8)))
    with pytest.raises(ValueError, match="NaN or inf"):
        SearchIndex.build(np.full((3, 8), np.nan))
    with pytest.raises(ValueError, match="metadata has 2 rows"):
        SearchIndex.build(np.ones((3, 8)), pd.DataFrame({"a": [1, 2]}))
    with pytest.raises(ValueError, match="training vectors"):
        SearchIndex.build(np.zeros((0, 8)), kind="ivf")


# ---- corrupt and mismatched files (case 28) ----------------------------------------------------

@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("good") / "idx"
    small_index("flat", n=1000, d=16).save(path)
    return path


@pytest.fixture
def copy(saved, tmp_path) -> Path:
    return Path(shutil.copytree(saved, tmp_path / "idx"))


def rewrite_manifest(path: Path) -> None:
    from clipkit.fileio import write_manifest
    write_manifest(path)


def test_truncated_index(copy):
    f = copy / "index.faiss"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(IndexLoadError, match="truncated or corrupt"):
        SearchIndex.load(copy)
    with pytest.raises(IndexLoadError, match=r"index\.faiss: truncated or corrupt"):
        SearchIndex.load(copy, verify=False)


def test_flipped_bytes_in_data_region_caught_only_by_checksum(copy):
    f = copy / "index.faiss"
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2: len(raw) // 2 + 8] = bytes(b ^ 0xFF for b in raw[len(raw) // 2: len(raw) // 2 + 8])
    f.write_bytes(bytes(raw))
    with pytest.raises(IndexLoadError, match="checksum mismatch"):
        SearchIndex.load(copy)
    SearchIndex.load(copy, verify=False)  # FAISS itself loads it silently: why the manifest exists


def test_random_bytes(copy):
    f = copy / "index.faiss"
    f.write_bytes(np.random.default_rng(0).bytes(f.stat().st_size))
    with pytest.raises(IndexLoadError, match="checksum mismatch"):
        SearchIndex.load(copy)
    with pytest.raises(IndexLoadError, match="truncated or corrupt"):
        SearchIndex.load(copy, verify=False)


def test_dim_mismatches(copy):
    with pytest.raises(IndexLoadError, match="dim mismatch.*d=16.*512"):
        SearchIndex.load(copy, expected_dim=512)
    info = json.loads((copy / "index.json").read_text())
    (copy / "index.json").write_text(json.dumps({**info, "dim": 32}))
    rewrite_manifest(copy)
    with pytest.raises(IndexLoadError, match="dim mismatch"):
        SearchIndex.load(copy)


@pytest.mark.parametrize("field,value", [("metric", "l2"), ("normalized", False), ("format_version", 99)])
def test_wrong_metric_normalization_or_version(copy, field, value):
    info = json.loads((copy / "index.json").read_text())
    (copy / "index.json").write_text(json.dumps({**info, field: value}))
    rewrite_manifest(copy)
    with pytest.raises(IndexLoadError, match="metric/normalization|format_version"):
        SearchIndex.load(copy)


def test_metadata_rows_differ_from_ntotal(copy):
    meta = pd.read_parquet(copy / "meta.parquet")
    meta.iloc[:-1].to_parquet(copy / "meta.parquet", index=False)
    rewrite_manifest(copy)
    with pytest.raises(IndexLoadError, match="count mismatch"):
        SearchIndex.load(copy)
    pd.concat([meta, meta.iloc[:1]], ignore_index=True).to_parquet(copy / "meta.parquet", index=False)
    rewrite_manifest(copy)
    with pytest.raises(IndexLoadError, match="count mismatch"):  # a live row the index does not hold
        SearchIndex.load(copy)


def test_missing_pieces(copy, tmp_path):
    with pytest.raises(IndexLoadError, match="missing index.json"):
        SearchIndex.load(tmp_path / "nowhere")
    v = copy / "vectors.npy"
    v.write_bytes(v.read_bytes()[:100])
    with pytest.raises(IndexLoadError, match=r"vectors\.npy: truncated or corrupt"):
        SearchIndex.load(copy, verify=False)
    (copy / "manifest.json").unlink()
    with pytest.raises(IndexLoadError, match="missing manifest"):
        SearchIndex.load(copy)


CORRUPT_LOADS = """
import shutil, sys
import numpy as np
from clipkit.errors import IndexLoadError
from clipkit.search import SearchIndex
saved, work = sys.argv[1], sys.argv[2]
rng = np.random.default_rng(0)
good = open(saved + "/index.faiss", "rb").read()
cases = {"truncated": good[:-17], "header": rng.bytes(16) + good[16:], "random": rng.bytes(4096),
         "empty": b"", "ids": good[:-40] + rng.bytes(40)}
for name, blob in cases.items():
    d = shutil.copytree(saved, work + "/" + name)
    open(d + "/index.faiss", "wb").write(blob)
    for verify in (True, False):
        try:
            SearchIndex.load(d, verify=verify)
            print(name, verify, "loaded")
        except IndexLoadError as e:
            print(name, verify, "refused", e)
"""


def test_corrupt_loads_in_subprocess_never_crash(saved, tmp_path):
    """FAISS deserialisation runs in a child process, so a crash would fail the test, not the run."""
    out = run_script(CORRUPT_LOADS, saved, tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 10 and all(" True refused" in ln for ln in lines if " True " in ln)
    assert all("refused" in ln for ln in lines if ln.split()[0] != "ids"), out.stdout


# ---- crash during save (case 29) ---------------------------------------------------------------

def test_failed_save_keeps_previous_index(copy, monkeypatch):
    before = SearchIndex.load(copy)
    want = before.search(before.vectors[:5], 5)
    changed = small_index("flat", n=1000, d=16, seed=9)
    blob = faiss.serialize_index(changed.index).tobytes()

    def half_write(index, path):
        Path(path).write_bytes(blob[:1000])
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(faiss, "write_index", half_write)
    with pytest.raises(OSError):
        changed.save(copy)
    after = SearchIndex.load(copy)
    np.testing.assert_array_equal(after.search(before.vectors[:5], 5)[1], want[1])
    assert sorted(p.name for p in copy.parent.iterdir()) == ["idx"]  # no temp directory left behind


DYING_SAVE = """
import os, signal, sys
import faiss, numpy as np
from clipkit.search import SearchIndex
ix = SearchIndex.load(sys.argv[1], mmap=False)
ix.add(np.ones((1, 16), np.float32))
blob = faiss.serialize_index(ix.index).tobytes()
def dying_write(index, path):
    open(path, "wb").write(blob[:1000])
    print("writing index", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
faiss.write_index = dying_write
ix.save(sys.argv[1])
"""


@pytest.mark.slow
def test_sigkill_during_index_write_keeps_previous_index(copy):
    out = run_script(DYING_SAVE, copy, timeout=120)
    assert out.returncode == -9 and "writing index" in out.stdout, out.stderr
    back = SearchIndex.load(copy)
    assert back.index.ntotal == 1000 and len(back.metadata) == 1000


# ---- threads: searches while another thread edits (issue 11, item 15) ----------------------------

EDIT_RACE = r'''
import json, sys, threading
import numpy as np, pandas as pd
from clipkit.search.index import SearchIndex

kind, rounds = sys.argv[1], int(sys.argv[2])
rng = np.random.default_rng(0)
unit = lambda a: (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)
x = unit(rng.standard_normal((2000, 32)))
ix = SearchIndex.build(x, pd.DataFrame({"name": [f"r{i}" for i in range(2000)], "group": np.arange(2000) % 5}),
                       kind=kind)
q, errors, stop = x[:8].copy(), [], threading.Event()

def searcher():
    while not stop.is_set():
        try:
            scores, ids = ix.search(q, 20, rerank=2, filter="group >= 0")
            for row in ix.results(scores, ids):
                assert all(hit["name"] == f"r{hit['id']}" for hit in row), row[:3]
        except Exception as e:
            errors.append(repr(e)[:300])
            return

threads = [threading.Thread(target=searcher) for _ in range(3)]
[t.start() for t in threads]
for _ in range(rounds):  # append rows (their metadata names their ids), then tombstone a few
    start = len(ix.metadata)
    new = ix.add(unit(rng.standard_normal((50, 32))),
                 pd.DataFrame({"name": [f"r{i}" for i in range(start, start + 50)], "group": 1}))
    ix.remove(new[:5])
stop.set()
[t.join() for t in threads]
print(json.dumps({"errors": errors, "rows": len(ix.metadata), "live": len(ix)}))
'''


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_add_remove_while_searching_in_threads(kind):
    """Real threads: 3 search (with rerank, a filter and results()) while one adds and removes rows. In a
    subprocess, so a crash inside FAISS reads as a failure, not a dead test run."""
    rounds = 100
    out = run_script(EDIT_RACE, kind, rounds, timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout)
    assert report == {"errors": [], "rows": 2000 + rounds * 50, "live": 2000 + rounds * 45}, report
