"""clipkit.search.collection: chunked, resumable, shardable embedding of image collections, and index builds from them."""
from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import faiss
import numpy as np
import pandas as pd
import pytest

import clipkit
from clipkit.search import collection as col
from clipkit.errors import DataError
from clipkit.search import SearchIndex

from helpers import random_image, run_script

N_IMAGES, BAD_ID, SHARD = 10, 5, 4


@pytest.fixture(scope="module")
def embedder(saved_tiny_dir):
    return clipkit.Embedder(saved_tiny_dir, device="cpu", progress=False)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """10 PNGs (one in a sub-folder), even ones with sidecar captions, image 5 corrupt."""
    root = tmp_path_factory.mktemp("images")
    (root / "sub").mkdir()
    for i in range(N_IMAGES):
        p = root / ("sub" if i == 9 else "") / f"im{i:02d}.png"
        random_image(i, (40 + 4 * i, 48)).save(p)
        if i % 2 == 0:
            p.with_suffix(".txt").write_text(f"caption number {i}")
    (root / f"im{BAD_ID:02d}.png").write_bytes(b"not a png")
    return root


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory, embedder, folder):
    out = tmp_path_factory.mktemp("emb") / "folder"
    summary = col.embed_collection(embedder, folder, out, shard_size=SHARD, num_workers=0, dtype="float32",
                                   progress=False)
    return out, summary


def embed(embedder, source, out, **kw):
    kw = {"shard_size": SHARD, "num_workers": 0, "progress": False, **kw}
    return col.embed_collection(embedder, source, out, **kw)


def test_folder_without_captions_keeps_ids_aligned(folder_run, folder, embedder):
    out, summary = folder_run
    vectors, meta = col.load_collection(out)
    assert summary.count == N_IMAGES and summary.written == [0, 1, 2] and summary.embedded == N_IMAGES - 1
    assert [f["id"] for f in summary.failures] == [BAD_ID] and summary.failures[0]["reason"] == "unidentified"
    assert meta["id"].tolist() == list(range(N_IMAGES))
    assert meta["ok"].tolist() == [i != BAD_ID for i in range(N_IMAGES)]
    assert meta.loc[BAD_ID, "error"] == "unidentified" and not vectors[BAD_ID].any()
    assert meta.loc[9, "image_rel"] == "sub/im09.png" and meta.loc[9, "label"] == "sub"
    assert meta.loc[2, "caption"] == "caption number 2" and meta.loc[3, "caption"] == ""
    good = meta.index[meta["ok"]]
    expected = embedder.images(meta.loc[good, "image"].tolist())
    # precision auto runs the image tower in bf16 on this kind of CPU: other batch shapes round differently
    # (~2e-5 seen); a row out of place would be off by far more
    np.testing.assert_allclose(vectors[good], expected, atol=1e-3)
    texts, _ = col.load_collection(out, texts=True)
    np.testing.assert_allclose(texts[2], embedder.texts(["caption number 2"])[0], atol=1e-5)
    assert not texts[3].any()  # no caption: zero row
    info = json.loads((out / "collection.json").read_text())
    assert info["dim"] == embedder.dim and info["count"] == N_IMAGES and info["model_id"].startswith("sha256:")


def test_table_source_with_workers_float16(tmp_path, folder, folder_run, embedder):
    rows = [{"image": f"im{i:02d}.png", "caption": f"c{i}", "style": "noto" if i % 3 else "openmoji"}
            for i in range(8)] + [{"image": "missing.png", "caption": "gone", "style": "noto"}]
    pd.DataFrame(rows).to_csv(folder / "table.csv", index=False)
    summary = embed(embedder, folder / "table.csv", tmp_path / "t", num_workers=2, captions=False)
    vectors, meta = col.load_collection(tmp_path / "t")
    assert np.load(tmp_path / "t" / "emb-00000.npy").dtype == np.float16
    assert not list((tmp_path / "t").glob("txt-*"))
    assert {f["id"]: f["reason"] for f in summary.failures} == {5: "unidentified", 8: "missing"}
    assert meta["style"].tolist() == [r["style"] for r in rows] and meta.loc[0, "image"] == str(folder / "im00.png")
    ref, _ = col.load_collection(folder_run[0])
    np.testing.assert_allclose(vectors[:8], ref[:8], atol=2e-3)  # float16 storage


def test_two_shards_merge_to_the_single_run(tmp_path, folder, folder_run, embedder):
    out = tmp_path / "sharded"
    first = embed(embedder, folder, out, shard=(1, 2), dtype="float32")
    assert first.written == [1]
    with pytest.raises(DataError, match=r"missing chunks \[0, 2\] of 3"):
        col.load_collection(out)
    embed(embedder, folder, out, shard=(0, 2), dtype="float32")
    vectors, meta = col.load_collection(out)
    ref_vectors, ref_meta = col.load_collection(folder_run[0])
    np.testing.assert_array_equal(vectors, ref_vectors)
    pd.testing.assert_frame_equal(meta, ref_meta)


def test_rerun_skips_finished_chunks_and_redoes_missing_ones(tmp_path, folder, embedder):
    out = tmp_path / "e"
    embed(embedder, folder, out)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = embed(embedder, folder, out)
    assert again.written == [] and again.skipped == [0, 1, 2] and again.embedded == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps
    (out / "meta-00001.parquet").unlink()
    third = embed(embedder, folder, out)
    assert third.written == [1] and third.skipped == [0, 2]
    assert (out / "emb-00000.npy").stat().st_mtime_ns == stamps["emb-00000.npy"]


def test_changed_settings_are_refused(tmp_path, folder, embedder, saved_tiny_dir):
    embed(embedder, folder, tmp_path / "e", shard=(0, 3))
    with pytest.raises(DataError, match="dtype: 'float16' -> 'float32'"):
        embed(embedder, folder, tmp_path / "e", dtype="float32")
    with pytest.raises(DataError, match="shard_size"):
        embed(embedder, folder, tmp_path / "e", shard_size=5)
    other = clipkit.Embedder(saved_tiny_dir, device="cpu", progress=False,
                             precision="int8" if embedder.precision.image != "int8" else "fp32")
    with pytest.raises(DataError, match="precision: 'image "):  # chunks at two precisions would not compare
        embed(other, folder, tmp_path / "e", shard=(1, 3))
    with pytest.raises(ValueError, match="shard"):
        embed(embedder, folder, tmp_path / "e", shard=(3, 3))


def test_failure_mid_chunk_leaves_no_partial_file(tmp_path, folder, embedder, monkeypatch):
    out, real_save = tmp_path / "e", col._save_npy

    def crash_in_chunk_1(path, array):  # half of chunk 1's vectors reach the disk, then the write dies
        if path.name == "emb-00001.npy":
            with col.atomic_path(path) as tmp:
                tmp.write_bytes(b"\x93NUMPY partial")
                raise OSError("simulated crash")
        real_save(path, array)

    monkeypatch.setattr(col, "_save_npy", crash_in_chunk_1)
    with pytest.raises(OSError, match="simulated crash"):
        embed(embedder, folder, out)
    assert sorted(p.name for p in out.iterdir()) == ["collection.json", "emb-00000.npy", "meta-00000.parquet",
                                                     "txt-00000.npy"]
    monkeypatch.setattr(col, "_save_npy", real_save)
    assert embed(embedder, folder, out).written == [1, 2]
    assert len(col.load_collection(out)[1]) == N_IMAGES


KILLED_EMBED = """
import os, signal, sys
from clipkit.search import collection as col
model, folder, out, shard = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
real = col._write_chunk
def kill_after_first(out, c, *a):
    real(out, c, *a)
    if c == 0:
        os.kill(os.getpid(), signal.SIGKILL)
col._write_chunk = kill_after_first
col.embed_collection(model, folder, out, shard_size=shard, num_workers=2, progress=False)
"""


@pytest.mark.slow
def test_sigkill_mid_run_then_resume(tmp_path, folder, saved_tiny_dir):
    """A real SIGKILL while chunk 1 is being embedded: chunk 0 is kept, nothing partial is left, a rerun finishes."""
    out = tmp_path / "e"
    proc = run_script(KILLED_EMBED, saved_tiny_dir, folder, out, SHARD)
    assert proc.returncode == -signal.SIGKILL
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "collection.json", "emb-00000.npy", "meta-00000.parquet", "txt-00000.npy"]
    summary = col.embed_collection(saved_tiny_dir, folder, out, shard_size=SHARD, num_workers=0, progress=False)
    assert summary.skipped == [0] and summary.written == [1, 2]


def test_failures_in_one_batch_keep_their_own_ids_and_reasons(tmp_path, folder, embedder):
    rows = ["im00.png", "missing.png", f"im{BAD_ID:02d}.png", "im01.png", "gone.png"]
    pd.DataFrame({"image": rows, "caption": "x"}).to_csv(folder / "mixed.csv", index=False)
    summary = embed(embedder, folder / "mixed.csv", tmp_path / "m", shard_size=8, batch_size=8)
    assert [(f["id"], f["reason"], Path(f["image"]).name) for f in summary.failures] == [
        (1, "missing", "missing.png"), (2, "unidentified", f"im{BAD_ID:02d}.png"), (4, "missing", "gone.png")]
    _, meta = col.load_collection(tmp_path / "m")
    assert meta["ok"].tolist() == [True, False, False, True, False]


def test_collection_of_another_format_is_refused(tmp_path):
    write_fake_collection(tmp_path / "old", n=10, size=5, bad=())
    info = json.loads((tmp_path / "old" / "collection.json").read_text())
    (tmp_path / "old" / "collection.json").write_text(json.dumps({**info, "format_version": 1}))
    with pytest.raises(DataError, match="collection format 1"):
        col.load_collection(tmp_path / "old")


def test_table_without_captions_and_with_empty_ones(tmp_path, folder):
    pd.DataFrame({"image": [str(folder / "im00.png"), "im01.png"], "k": [1, 2]}).to_csv(tmp_path / "a.csv", index=False)
    (tmp_path / "im01.png").write_bytes((folder / "im01.png").read_bytes())
    table = col.read_source(tmp_path / "a.csv")
    assert table["caption"].tolist() == ["", ""] and table["image"].tolist() == [str(folder / "im00.png"),
                                                                               str(tmp_path / "im01.png")]
    pd.DataFrame({"image": ["a.png", "b.png"], "caption": ["x", ""]}).to_csv(tmp_path / "b.csv", index=False)
    assert col.read_source(tmp_path / "b.csv").attrs["dropped_rows"] == 1


def test_reserved_columns_and_empty_sources(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        col.read_source(tmp_path / "empty")
    pd.DataFrame({"image": ["a.png"], "caption": ["x"], "ok": [1]}).to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(DataError, match="reserved"):
        col.read_source(tmp_path / "t.csv")
    with pytest.raises(DataError, match="no such"):
        col.read_source(tmp_path / "nope")
    assert col.shard_from_env({"RANK": "2", "WORLD_SIZE": "4"}) == (2, 4) and col.shard_from_env({}) == (0, 1)


def test_index_ids_are_collection_ids(tmp_path, folder_run):
    out, _ = folder_run
    vectors, meta = col.load_collection(out)
    index = col.build_index_from_collection(out, tmp_path / "idx", kind="flat")
    assert index.build_report["failed"] == 1 and len(index) == N_IMAGES - 1
    loaded = SearchIndex.load(tmp_path / "idx")
    ok = meta.index[meta["ok"]].to_numpy()
    scores, ids = loaded.search(vectors[ok], 3)
    assert (ids[:, 0] == ok).all() and BAD_ID not in ids
    res = loaded.results(scores, ids)[0][0]
    assert res["id"] == 0 and res["image"] == meta.loc[0, "image"] and res["image_rel"] == "im00.png"
    assert "ok" not in res and "path" not in res


# ---------------------------------------------------------------------------------------------- on-disk IVF


def write_fake_collection(out: Path, n: int = 6000, d: int = 32, size: int = 1500, bad=(7, 2000)) -> np.ndarray:
    """A collection in the on-disk format from clustered vectors (no model needed); rows in `bad` failed."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, d))[rng.integers(0, 50, n)] + 0.3 * rng.standard_normal((n, d))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)
    x[list(bad)] = 0
    out.mkdir(parents=True)
    chunks = -(-n // size)
    (out / "collection.json").write_text(json.dumps({"format_version": col.FORMAT_VERSION, "model_id": "sha256:fake", "dim": d,
                                                     "dtype": "float16", "count": n, "shard_size": size,
                                                     "chunks": chunks, "captions": False}))
    for c in range(chunks):
        ids = np.arange(c * size, min((c + 1) * size, n))
        np.save(out / f"emb-{c:05d}.npy", x[ids])
        pd.DataFrame({"id": ids, "image": [f"/x/{i}.png" for i in ids], "image_rel": [f"{i}.png" for i in ids],
                      "caption": "", "group": ids % 3, "ok": ~np.isin(ids, bad),
                      "error": [("decode_error" if i in bad else None) for i in ids]}
                     ).to_parquet(out / f"meta-{c:05d}.parquet", index=False)
    return x.astype(np.float32)


@pytest.mark.parametrize("factory", ["IVF32,Flat", "IVF16,PQ8x4"])
def test_ondisk_ivf_equals_in_memory_ivf(tmp_path, factory):
    faiss.omp_set_num_threads(1)
    x = write_fake_collection(tmp_path / "emb")
    mem = col.build_index_from_collection(tmp_path / "emb", tmp_path / "mem", kind=factory, progress=False)
    disk = col.build_ivf_ondisk(tmp_path / "emb", tmp_path / "disk", factory, progress=False)
    assert (tmp_path / "disk" / "lists.ivfdata").is_file() and not list(tmp_path.glob(".disk.ondisk-*"))
    shutil.move(tmp_path / "disk", tmp_path / "moved")  # list data is found beside index.faiss
    disk = SearchIndex.load(tmp_path / "moved")
    q = x[::97][:40]
    q = q[np.abs(q).sum(1) > 0]
    for kw in ({"nprobe": 4}, {"nprobe": 4, "rerank": 3}, {"nprobe": 4, "filter": "group == 1"}):
        s_mem, i_mem = mem.search(q, 10, **kw)
        s_disk, i_disk = disk.search(q, 10, **kw)
        np.testing.assert_array_equal(i_disk, i_mem)
        np.testing.assert_array_equal(s_disk, s_mem)
    assert not np.isin([7, 2000], i_mem).any()
    report = disk.build_report
    assert report["on_disk"] and report["failed"] == 2 and report["count"] == mem.build_report["count"]
    measured = ("eval_queries", "nprobe", "recall@10", "target_recall", "recall@10_rerank10", "warning")
    assert {k: report.get(k) for k in measured} == {k: mem.build_report.get(k) for k in measured}  # one tuner


def test_ondisk_factory_rules():
    assert col.ondisk_factory("auto", 100_000, 64) == "IVF1264,Flat"
    assert col.ondisk_factory("ivfpq", 100_000, 64) == "IVF1264,PQ16"  # fast-scan lists cannot go on disk
    for kind in ("PQ8", "flat", "hnsw"):
        with pytest.raises(ValueError, match="IVF"):
            col.ondisk_factory(kind, 1000, 64)


# ---- issue 11, item 12: the on-disk IVF build on a full disk --------------------------------------

_INDEX_CLI = "import sys; from clipkit.cli import main; sys.exit(main(sys.argv[1:]))"


@pytest.mark.parametrize("size,what", [("512k", "vectors.npy: not enough disk space: needs 1024128 bytes"),
                                       ("1200k", "write error in"),
                                       ("2200k", "lists.ivfdata: not enough disk space: needs 1055736 bytes")],
                         ids=["vectors-memmap", "faiss-write", "faiss-lists-mmap"])
def test_ondisk_build_on_a_full_tmpfs_is_a_one_line_error(tmp_path, size, what):
    """Before: the vectors memmap and FAISS's list file (sized by truncate, written through mmap) were sparse, so
    on a full tmpfs `clipkit index build --on-disk` died of SIGBUS (512k, 2200k) with its temp folder left
    behind, and a failed FAISS write printed a C++ traceback (1200k)."""
    from helpers import small_tmpfs

    write_fake_collection(tmp_path / "emb", n=4000, d=64, size=1000, bad=(7,))  # vectors.npy: 1 MB
    with small_tmpfs(tmp_path / "full", size) as mnt:
        out = run_script(_INDEX_CLI, "index", "build", "--embeddings", tmp_path / "emb", "--out", mnt / "idx",
                         "--on-disk", "--kind", "IVF16,Flat", "--quiet")
        left = sorted(p.name for p in mnt.iterdir())
    err = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2, f"exit {out.returncode} (-7 is SIGBUS): {out.stderr[-1500:]}"
    assert len(err) == 1 and err[0].startswith("clipkit index: error: ") and "(No space left on device)" in err[0], err
    assert what in err[0] and left == []
