"""Tar shards for training: `clipkit data shards`, shard specs (folders, pipe:), and the exact, rank-split stream."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from clipkit.cli import main
from clipkit.data import shards as shards_mod
from clipkit.data.samples import SkipCounter, make_loader
from clipkit.data.shard_writer import write_shards
from clipkit.data.shards import TarShardDataset, expand_shards, read_raw_shards, shard_sizes
from clipkit.data.stream import ShardStream
from clipkit.errors import DataError
from clipkit.model.config import PreprocessConfig
from clipkit.model.tokenizer import byte_level_tokenizer
from clipkit.model.transforms import Preprocess
from clipkit.train import TrainConfig
from clipkit.train.streamdata import open_shards

S = 16
PRE, TOK = Preprocess(PreprocessConfig(image_size=S)), byte_level_tokenizer(24)


def _png_bytes(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20, 18), (i * 37 % 256, i * 91 % 256, i * 13 % 256)).save(buf, "PNG")
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def _shard(path: Path, keys: list[str], members: dict[str, dict[str, bytes]] = None) -> Path:
    """A shard of good `key.png` + `key.txt` samples; `members[key]` replaces a sample's members."""
    with tarfile.open(path, "w") as tar:
        for i, key in enumerate(keys):
            for ext, payload in (members or {}).get(key, {"png": _png_bytes(i), "txt": f"cap {key}".encode()}).items():
                _add(tar, f"{key}.{ext}", payload)
    return path


@pytest.fixture
def table(tmp_path: Path) -> Path:
    """10 captioned PNGs with a label column, one row pointing at a missing file."""
    rows = []
    for i in range(10):
        (tmp_path / f"im{i}.png").write_bytes(_png_bytes(i))
        rows.append(f"im{i}.png,caption {i},c{i % 3}")
    rows.append("gone.png,missing image,c0")
    (tmp_path / "t.csv").write_text("image,caption,label\n" + "\n".join(rows) + "\n")
    return tmp_path / "t.csv"


def test_data_shards_writes_shards_with_counts_and_the_bytes_unchanged(table, tmp_path, capsys):
    out = tmp_path / "shards"
    assert main(["data", "shards", str(table), "--out", str(out), "--shard-size", "4", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "wrote 10 samples in 3 shard(s)" in text and "skipped 1 row(s): missing" in text
    assert json.loads((out / "sizes.json").read_text()) == {"shard-00000.tar": 4, "shard-00001.tar": 4,
                                                            "shard-00002.tar": 2}
    raw = list(read_raw_shards(expand_shards(str(out / "shard-{00000..00002}.tar"))))
    assert [r["__key__"] for r in raw] == [f"{i:09d}" for i in range(10)]  # keys are the table's row numbers
    assert raw[3]["png"] == (table.parent / "im3.png").read_bytes() and raw[3]["txt"] == b"caption 3"
    assert json.loads(raw[4]["json"])["label"] == "c1"
    assert shard_sizes(expand_shards(out)) == 10  # a folder of shards is a spec too
    with pytest.raises(DataError, match="not an empty folder"):
        write_shards(table, out, progress=False)


def test_same_rows_give_the_same_shard_bytes(table, tmp_path):
    a, b = write_shards(table, tmp_path / "a", progress=False), write_shards(table, tmp_path / "b", progress=False)
    assert (a.out / a.shards[0]).read_bytes() == (b.out / b.shards[0]).read_bytes()


def test_shard_folder_with_images_is_refused_and_counts_are_needed(tmp_path):
    _shard(tmp_path / "a.tar", ["k0", "k1"])
    cfg = TrainConfig(train_data=str(tmp_path), output=str(tmp_path / "run"))
    with pytest.raises(DataError, match="sizes.json"):
        open_shards(cfg)  # no counts file and no --train-num-samples: the epoch length is unknown
    cfg.train_num_samples = 5
    assert open_shards(cfg).num_samples == 5
    (tmp_path / "x.png").write_bytes(_png_bytes(0))
    with pytest.raises(DataError, match="both tar shards and images"):
        expand_shards(tmp_path)


def test_pipe_specs_run_only_when_allowed(tmp_path):
    _shard(tmp_path / "a.tar", ["k0", "k1", "k2"])
    spec = f"pipe:cat {tmp_path / 'a.tar'}"
    cfg = TrainConfig(train_data=spec, output=str(tmp_path / "run"), train_num_samples=3)
    with pytest.raises(DataError):
        open_shards(cfg)
    cfg.allow_pipe = True
    source = open_shards(cfg)
    keys = [r["__key__"] for r in read_raw_shards(source.urls, allow_pipe=True)]
    assert keys == ["k0", "k1", "k2"]


def _stream_keys(stream: ShardStream, n: int, workers: int = 0) -> list[str]:
    """The keys of the first `n` items (batch size 1) of a stream, in the order a loader hands them out."""
    loader = make_loader(stream, batch_size=1, num_workers=workers)
    out = []
    for batch in loader:
        out.append(batch["keys"][0].rsplit(":", 1)[1])
        if len(out) == n:
            return out
    raise AssertionError("stream ended")


def _shards(tmp_path: Path, n: int = 4, per: int = 5) -> list[str]:
    return [str(_shard(tmp_path / f"s{s}.tar", [f"s{s}k{k}" for k in range(per)])) for s in range(n)]


def test_stream_splits_shards_by_rank_and_worker_and_is_seeded(tmp_path):
    urls = _shards(tmp_path)
    reader = TarShardDataset(urls, PRE, TOK)
    per_slot = {}
    for rank in range(2):
        for worker in range(2):
            stream = ShardStream(reader, seed=1, rank=rank, world=2, workers=2, shuffle_buffer=3)
            per_slot[rank, worker] = stream.shards_of(worker, 0)
    assert sorted(u for shards in per_slot.values() for u in shards) == sorted(urls)  # each shard read once a pass
    one = ShardStream(reader, seed=1, rank=1, world=2, workers=2, shuffle_buffer=3)
    keys = _stream_keys(one, 12, workers=2)
    assert keys == _stream_keys(ShardStream(reader, seed=1, rank=1, world=2, workers=2, shuffle_buffer=3), 12, 2)
    mine = {Path(u).stem for w in range(2) for u in one.shards_of(w, 0)}
    assert {k.split("k")[0] for k in keys[:10]} == mine  # rank 1 reads only its own shards
    other = _stream_keys(ShardStream(reader, seed=2, rank=0, world=1, workers=1, shuffle_buffer=8), 20)
    base = _stream_keys(ShardStream(reader, seed=1, rank=0, world=1, workers=1, shuffle_buffer=8), 20)
    assert sorted(other) == sorted(base) and other != base  # one pass holds every sample; the seed shuffles


def test_stream_resumes_at_a_recorded_position(tmp_path):
    reader = TarShardDataset(_shards(tmp_path, n=2, per=7), PRE, TOK)
    full = ShardStream(reader, seed=5, workers=1, shuffle_buffer=4)
    items = list(zip(range(30), full.slot_items(0)))  # more than a pass (14): the stream goes on
    later = ShardStream(reader, seed=5, workers=1, shuffle_buffer=4)
    later.next_positions(items[17][1]["stream"])
    later.start(later.positions)
    again = [item for _, item in zip(range(12), later.slot_items(0))]
    assert [x["key"] for x in again] == [x["key"] for _, x in items[18:]]
    assert all(torch.equal(a["pixels"], b["pixels"]) for a, (_, b) in zip(again, items[18:]))


def test_bad_samples_are_replaced_and_counted_per_reason(tmp_path, monkeypatch):
    monkeypatch.setattr(shards_mod, "MAX_MEMBER_BYTES", 4096)
    bad = {"k1": {"png": b"not an image", "txt": b"corrupt"}, "k2": {"png": _png_bytes(2)},
           "k3": {"exe": b"MZ...", "txt": b"wrong extension"}, "k4": {"png": _png_bytes(4) + bytes(5000), "txt": b"x"},
           "k5": {"png": _png_bytes(5), "txt": b"nan"}}
    a = _shard(tmp_path / "a.tar", [f"k{i}" for i in range(8)], bad)  # 3 good samples, k7 the last
    b = _shard(tmp_path / "b.tar", [f"b{i}" for i in range(5)])
    (tmp_path / "c.tar").write_bytes(b.read_bytes()[:552])  # truncated inside its first image
    reader = TarShardDataset([a, b, tmp_path / "c.tar"], PRE, TOK)
    seed = next(s for s in range(100) if ShardStream(reader, seed=s).shards_of(0, 0)[-1] == str(b))
    stream = ShardStream(reader, seed=seed, shuffle_buffer=0)  # b read last: no bad sample ends the pass
    counter = SkipCounter()
    batches = [x for _, x in zip(range(3), make_loader(stream, batch_size=3))]  # the 9 good samples of a pass
    for batch in batches:
        counter.update(batch)
    assert [len(x["index"]) for x in batches] == [3, 3, 3]  # every batch full: the bad ones were replaced
    assert dict(counter.by_reason) == {"unidentified": 1, "no_caption": 1, "unsupported_extension": 1,
                                       "oversize": 1, "empty_caption": 1}
    assert counter.seen == 9 + 5 and counter.bad_shards == [str(tmp_path / "c.tar")]
    with pytest.raises(DataError, match="too much bad data"):
        counter.check(0.2, final=True)


def test_shard_options_on_a_table_or_out_of_range_are_refused(table, tmp_path):
    from clipkit.train import TrainingError
    from clipkit.train.setup import open_source

    with pytest.raises(TrainingError, match="for tar shards"):
        open_source(TrainConfig(train_data=str(table), output=str(tmp_path / "r"), train_num_samples=100))
    spec = write_shards(table, tmp_path / "s", progress=False).spec
    with pytest.raises(TrainingError, match=">= 1"):
        open_source(TrainConfig(train_data=spec, output=str(tmp_path / "r"), train_num_samples=0))
    assert open_source(TrainConfig(train_data=spec, output=str(tmp_path / "r"))).num_samples == 10
