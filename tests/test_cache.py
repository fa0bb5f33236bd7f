"""Decoded-image cache: same pixels as the uncached path, exact skips, reuse on a matching fingerprint."""
from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image

from clipkit.data import cache as cache_mod
from clipkit.data.cache import CachedPairDataset, DecodedCache
from clipkit.model.config import PreprocessConfig
from clipkit.data import PairDataset, SkipCounter, make_loader
from clipkit.errors import DataError
from clipkit.model.tokenizer import byte_level_tokenizer
from clipkit.model.transforms import Preprocess

S = 16
CFG = PreprocessConfig(image_size=S)
TOK = byte_level_tokenizer(16)


@pytest.fixture
def table(tmp_path: Path) -> pd.DataFrame:
    """Six photos-ish PNGs/JPEGs (one image shared by two captions) plus a zero-byte and a missing file."""
    rows = []
    for i in range(6):
        img = Image.effect_noise((40 + 8 * i, 30), 40 + 10 * i).convert("RGB")
        path = tmp_path / f"img{i}.{'png' if i % 2 else 'jpg'}"
        img.save(path)
        rows.append((str(path), f"picture {i}"))
    rows.append((rows[0][0], "picture 0 again"))
    (tmp_path / "zero.jpg").write_bytes(b"")
    rows += [(str(tmp_path / "zero.jpg"), "zero"), (str(tmp_path / "gone.png"), "gone")]
    return pd.DataFrame(rows, columns=["image", "caption"])


def test_cached_matches_uncached(tmp_path: Path, table: pd.DataFrame) -> None:
    cache = DecodedCache.build(table, CFG, tmp_path / "cache", num_workers=0, progress=False)
    assert cache.pixels.shape == (8, S, S, 3) and int(cache.valid.sum()) == 6  # 8 distinct paths, 6 readable
    plain, cached = PairDataset(table, Preprocess(CFG), TOK), CachedPairDataset(table, cache, TOK, CFG)
    for i in range(len(table)):
        a, b = plain[i], cached[i]
        assert a.keys() == b.keys() and a["index"] == b["index"] == i
        if "skip" in a:
            assert a["skip"] == b["skip"]
        else:
            assert torch.allclose(a["pixels"], b["pixels"], atol=1e-6)
            assert torch.equal(a["input_ids"], b["input_ids"])


def test_two_epochs_through_workers(tmp_path: Path, table: pd.DataFrame) -> None:
    cache = DecodedCache.build(table, CFG, tmp_path / "cache", num_workers=2, progress=False)
    ds = CachedPairDataset(table, cache, TOK, CFG, train=True)
    loader = make_loader(ds, batch_size=4, shuffle=True, num_workers=2, seed=0)
    for _ in range(2):
        counter = SkipCounter()
        for batch in loader:
            counter.update(batch)
            assert batch["pixels"].shape[1:] == (3, S, S) and torch.isfinite(batch["pixels"]).all()
        assert counter.seen == 9 and dict(counter.by_reason) == {"unidentified": 1, "missing": 1}


def test_rebuild_only_when_fingerprint_changes(tmp_path: Path, table: pd.DataFrame, monkeypatch) -> None:
    first = DecodedCache.build(table, CFG, tmp_path / "cache", num_workers=0, progress=False)
    calls = []
    real = cache_mod._decode_into
    monkeypatch.setattr(cache_mod, "_decode_into", lambda *a: calls.append(1) or real(*a))
    again = DecodedCache.build(table, CFG, tmp_path / "cache", num_workers=0, progress=False)
    assert calls == [] and again.fingerprint == first.fingerprint
    Image.new("RGB", (20, 20), "red").save(table["image"][1])
    os.utime(table["image"][1], ns=(1, 1))
    changed = DecodedCache.build(table, CFG, tmp_path / "cache", num_workers=0, progress=False)
    assert calls == [1] and changed.fingerprint != first.fingerprint
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".cache")]  # no temp folders left behind


def test_corrupt_cache_and_config_mismatch(tmp_path: Path, table: pd.DataFrame) -> None:
    cache = DecodedCache.build(table, CFG, tmp_path / "cache", num_workers=0, progress=False)
    with pytest.raises(DataError, match="cache built for"):
        CachedPairDataset(table, cache, TOK, PreprocessConfig(image_size=S + 8))
    extra = pd.concat([table, pd.DataFrame({"image": ["/nope.png"], "caption": ["x"]})], ignore_index=True)
    with pytest.raises(DataError, match="not in the cache"):
        CachedPairDataset(extra, cache, TOK, CFG)
    pixels = tmp_path / "cache" / "pixels.u8"
    pixels.write_bytes(pixels.read_bytes()[:100])
    with pytest.raises(DataError, match="corrupt"):
        DecodedCache.open(tmp_path / "cache")
    rebuilt = DecodedCache.build(table, CFG, tmp_path / "cache", num_workers=0, progress=False)
    assert rebuilt.pixels.shape == (8, S, S, 3)
    with pytest.raises(DataError, match="not a readable"):
        DecodedCache.open(tmp_path / "nothing")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="refusing to replace"):
        DecodedCache.build(table, CFG, tmp_path / "mine", num_workers=0, progress=False)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


# ---- issue 11, item 12: a full disk while building the cache --------------------------------------

_BUILD_CACHE = r"""
import sys
import pandas as pd
from clipkit.data.cache import DecodedCache
from clipkit.model.config import PreprocessConfig

table = pd.DataFrame({"image": sys.argv[2:], "caption": "x"})
try:
    DecodedCache.build(table, PreprocessConfig(image_size=224), sys.argv[1], num_workers=0, progress=False)
except OSError as e:
    print(e.strerror, file=sys.stderr)
    sys.exit(3)
"""


def _images(tmp_path: Path, n: int) -> list[str]:
    paths = []
    for i in range(n):
        p = tmp_path / f"big{i}.png"
        Image.effect_noise((240, 240), 30 + i).convert("RGB").save(p)
        paths.append(str(p))
    return paths


def test_cache_on_a_full_tmpfs_fails_with_enospc_not_sigbus(tmp_path: Path) -> None:
    """Before: the decoded pixels went into a sparse memmap; on a full tmpfs the process died of SIGBUS ("Bus
    error") with no message and no cleanup. 10 images of 224 px need 1.5 MB; the tmpfs holds 1 MiB."""
    from helpers import run_script, small_tmpfs

    paths = _images(tmp_path, 10)
    with small_tmpfs(tmp_path / "full", "1M") as mnt:
        out = run_script(_BUILD_CACHE, mnt / "cache", *paths)
        left = sorted(p.name for p in mnt.iterdir())
    assert out.returncode == 3, f"exit {out.returncode} (-7 is SIGBUS): {out.stderr[-1500:]}"
    need = 10 * 224 * 224 * 3
    assert f"pixels.u8: not enough disk space: needs {need} bytes" in out.stderr and "Traceback" not in out.stderr
    assert left == []  # the temporary folder is gone


def test_cache_reserve_failure_is_reported_before_any_decoding(tmp_path: Path, table: pd.DataFrame,
                                                               monkeypatch) -> None:
    """Where no tmpfs can be mounted: the reservation itself fails (as posix_fallocate does on a full disk)."""
    import errno

    decoded = []
    monkeypatch.setattr(os, "posix_fallocate", lambda *a: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    monkeypatch.setattr(cache_mod, "make_loader", lambda *a, **k: decoded.append(1) or [])
    with pytest.raises(OSError, match=r"pixels\.u8: not enough disk space: needs 6144 bytes"):
        DecodedCache.build(table, CFG, tmp_path / "cache", num_workers=0, progress=False)
    assert decoded == [] and not list(tmp_path.glob(".cache*")) and not (tmp_path / "cache").exists()
