"""Pair tables, folders and tar shards: RELIABILITY.md section A cases 9-15 and the dataset/loader contract."""
from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image

from clipkit.data import expand_shards
from clipkit.model.config import PreprocessConfig
from clipkit.data import (PairDataset, SkipCounter, TarShardDataset, collate, make_loader, pair_dataset,
                          read_folder, read_pairs, read_table)
from clipkit.errors import DataError
from clipkit.model.tokenizer import byte_level_tokenizer
from clipkit.model.transforms import Preprocess

S, L = 16, 24
PRE = Preprocess(PreprocessConfig(image_size=S))
TOK = byte_level_tokenizer(L)
COLORS = ["red", "green", "blue", "yellow", "white", "black", "purple", "orange"]


def _png(path: Path, color: str = "red", size: tuple[int, int] = (40, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def _png_bytes(color: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (24, 20), color).save(buf, "PNG")
    return buf.getvalue()


def _csv(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _items(ds) -> list[dict]:
    return list(ds)


# ------------------------------------------------------------------------------------------ tables


@pytest.mark.parametrize("ext", ["csv", "tsv", "parquet", "jsonl"])
def test_read_table_formats_with_renamed_columns(tmp_path: Path, ext: str) -> None:
    for i in range(3):
        _png(tmp_path / "img" / f"{i}.png", COLORS[i])
    df = pd.DataFrame({"file": [f"img/{i}.png" for i in range(3)], "text": ["a red", "a green", "a blue"],
                       "label": ["r", "g", "b"]})
    path = tmp_path / f"t.{ext}"
    if ext in ("csv", "tsv"):
        df.to_csv(path, sep="," if ext == "csv" else "\t", index=False)
    elif ext == "parquet":
        df.to_parquet(path)
    else:
        df.to_json(path, orient="records", lines=True)
    out = read_table(path, image_column="file", caption_column="text")
    assert list(out.columns) == ["image", "caption", "image_rel", "label"]
    assert out["caption"].tolist() == ["a red", "a green", "a blue"]
    assert out["image"].tolist() == [str(tmp_path / "img" / f"{i}.png") for i in range(3)]
    assert out["image_rel"].tolist() == df["file"].tolist() and out["label"].tolist() == ["r", "g", "b"]


def test_relative_paths_resolve_against_the_table_folder(tmp_path: Path, monkeypatch) -> None:
    _png(tmp_path / "data" / "img" / "a.png")
    absolute = _png(tmp_path / "elsewhere" / "b.png")
    table = _csv(tmp_path / "data" / "t.csv", f"image,caption\nimg/a.png,one\n{absolute},two\n")
    (tmp_path / "cwd" / "img").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "cwd")
    out = read_table(os.path.relpath(table))
    assert out["image"].tolist() == [str(tmp_path / "data" / "img" / "a.png"), str(absolute)]


def test_empty_and_na_captions_are_dropped_and_counted(tmp_path: Path) -> None:
    rows = ["a.png,a cat", "b.png,", "c.png,   ", "d.png,NA", "e.png,null", "f.png,nan", "g.png,N/A", 'h.png," ok "']
    out = read_table(_csv(tmp_path / "t.csv", "image,caption\n" + "\n".join(rows) + "\n"))
    assert out["caption"].tolist() == ["a cat", "ok"]
    assert out.attrs["dropped_empty_captions"] == 6
    pd.DataFrame({"image": ["a.png", "b.png", "c.png"], "caption": ["x", None, float("nan")]}).to_parquet(
        tmp_path / "t.parquet")
    out = read_table(tmp_path / "t.parquet")
    assert out["caption"].tolist() == ["x"] and out.attrs["dropped_empty_captions"] == 2


def test_trailing_comma_on_every_row(tmp_path: Path) -> None:
    shifted = _csv(tmp_path / "shift.csv", "image,caption\na.png,a cat,\nb.png,a dog,\n")
    with pytest.raises(DataError, match=r"line 2.*trailing comma"):
        read_table(shifted)  # pandas alone would make `image` the index and put captions under `image`
    both = read_table(_csv(tmp_path / "both.csv", "image,caption,\na.png,a cat,\nb.png,a dog,\n"))
    assert list(both.columns) == ["image", "caption", "image_rel"]
    assert both["image_rel"].tolist() == ["a.png", "b.png"] and both["caption"].tolist() == ["a cat", "a dog"]


def test_bom_and_multiline_quoted_caption(tmp_path: Path) -> None:
    path = tmp_path / "bom.csv"
    path.write_bytes('image,caption\na.png,"two\nlines"\n'.encode("utf-8-sig"))
    out = read_table(path)
    assert out["caption"].tolist() == ["two\nlines"]


def test_latin1_bytes_error_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "latin.csv"
    path.write_bytes("image,caption\na.png,ok\nb.png,café\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin\.csv.*line 3.*UTF-8"):
        read_table(path)


def test_extra_fields_error_with_line_or_skip(tmp_path: Path) -> None:
    text = "image,caption\na.png,one\nb.png,two,x,y\nc.png,three\n"
    with pytest.raises(DataError, match=r"line 3"):
        read_table(_csv(tmp_path / "t.csv", text))
    with pytest.raises(DataError, match=r"line 2"):  # the first data row: pandas would drop 'x' silently
        read_table(_csv(tmp_path / "first.csv", "image,caption\na.png,a dog, running\nb.png,two\n"))
    out = read_table(_csv(tmp_path / "t2.csv", text + "d.png,four,z\n"), on_bad_lines="skip")
    assert out["caption"].tolist() == ["one", "three"] and out.attrs["bad_lines_skipped"] == 2


def test_missing_column_lists_available(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"no column 'image'.*filepath, title"):
        read_table(_csv(tmp_path / "t.csv", "filepath,title\na.png,x\n"))


def test_multiple_captions_per_image(tmp_path: Path) -> None:
    lines = [{"image": "a.png", "caption": ["one", "two", ""]}, {"image": "b.png", "caption": "three"}]
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    pd.DataFrame({"image": ["a.png", "b.png"], "caption": [["one", "two"], ["three"]]}).to_parquet(tmp_path / "t.parquet")
    _csv(tmp_path / "list.csv", 'image,caption\na.png,"[""one"", ""two""]"\nb.png,[not json]\n')
    _csv(tmp_path / "rows.csv", "image,caption\na.png,one\na.png,two\nb.png,three\n")
    for name, want in [("t.jsonl", ["one", "two", "three"]), ("t.parquet", ["one", "two", "three"]),
                       ("list.csv", ["one", "two", "[not json]"]), ("rows.csv", ["one", "two", "three"])]:
        out = read_table(tmp_path / name)
        assert out["caption"].tolist() == want, name
        assert out["image_rel"].tolist() == ["a.png", "a.png", "b.png"], name


def test_parquet_damage_names_the_file(tmp_path: Path, monkeypatch) -> None:
    good = tmp_path / "good.parquet"
    pd.DataFrame({"image": [f"{i}.png" for i in range(50)], "caption": ["x"] * 50}).to_parquet(good)
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(DataError, match="cut.parquet"):
        read_table(cut)
    pd.DataFrame({"image": [1, 2], "caption": [3.5, 4.5]}).to_parquet(tmp_path / "types.parquet")
    with pytest.raises(DataError, match=r"types\.parquet.*'image' must hold text"):
        read_table(tmp_path / "types.parquet")
    import pyarrow

    monkeypatch.setattr(pyarrow, "__version__", "14.0.0")
    with pytest.raises(DataError, match="CVE-2023-47248"):
        read_table(good)


def test_read_folder_sidecars_and_class_folders(tmp_path: Path) -> None:
    root = tmp_path / "pets"
    for cls, name in [("cat", "c1"), ("cat", "c2"), ("dog", "d1")]:
        _png(root / cls / f"{name}.png")
        (root / cls / f"{name}.txt").write_text(f"a {cls} {name}\n")
    _png(root / "dog" / "nocap.jpg")
    _png(root / "dog" / "empty.png")
    (root / "dog" / "empty.txt").write_text("  \n")
    out = read_folder(root)
    assert out["caption"].tolist() == ["a cat c1", "a cat c2", "a dog d1"]
    assert out["label"].tolist() == ["cat", "cat", "dog"] and out["image_rel"].tolist()[0] == "cat/c1.png"
    assert out.attrs["missing_captions"] == 1 and out.attrs["dropped_empty_captions"] == 1
    flat = tmp_path / "flat"
    _png(flat / "a.png")
    (flat / "a.txt").write_text("only")
    assert "label" not in read_pairs(flat).columns


def test_read_pairs_dispatch(tmp_path: Path) -> None:
    _png(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("x")
    assert len(read_pairs(tmp_path)) == 1
    assert len(read_pairs(_csv(tmp_path / "t.csv", "path,text\na.png,x\n"), image_column="path", caption_column="text")) == 1
    with pytest.raises(DataError, match="TarShardDataset"):
        read_pairs(tmp_path / "shard-{000..001}.tar")
    with pytest.raises(DataError, match="unsupported table type"):
        read_pairs(tmp_path / "a.txt")


# ------------------------------------------------------------------------------------------ datasets


def _bad_table(tmp_path: Path, n_good: int, bad: dict[str, str]) -> pd.DataFrame:
    """A table of good PNGs plus bad files by name: 'trunc' (half a JPEG), 'zero' (0 bytes), 'missing'."""
    rows = [(f"good{i}.png", f"caption {i}") for i in range(n_good)]
    for i, _ in enumerate(rows):
        _png(tmp_path / f"good{i}.png", COLORS[i % len(COLORS)])
    for name, kind in bad.items():
        if kind == "trunc":
            buf = io.BytesIO()
            Image.effect_noise((256, 256), 60).convert("RGB").save(buf, "JPEG", quality=90)
            (tmp_path / name).write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
        elif kind == "zero":
            (tmp_path / name).write_bytes(b"")
        rows.append((name, f"bad {name}"))
    text = "image,caption\n" + "".join(f"{a},{b}\n" for a, b in rows)
    return read_table(_csv(tmp_path / "t.csv", text))


def test_bad_images_are_skipped_with_exact_counts_across_workers(tmp_path: Path) -> None:
    table = _bad_table(tmp_path, 10, {"trunc.jpg": "trunc", "zero.jpg": "zero", "gone.jpg": "missing"})
    ds = PairDataset(table, PRE, TOK)
    counter, seen_index = SkipCounter(), []
    for batch in make_loader(ds, batch_size=4, shuffle=True, num_workers=2, seed=1):
        counter.update(batch)
        assert batch["pixels"].shape[1:] == (3, S, S) and batch["input_ids"].shape[1:] == (L,)
        for row, ids in zip(batch["index"].tolist(), batch["input_ids"]):  # pixels and tokens stay paired
            assert torch.equal(ids, TOK([table["caption"][row]])["input_ids"][0])
        seen_index += batch["index"].tolist()
    assert sorted(seen_index) == list(range(10))
    assert counter.seen == 13 and dict(counter.by_reason) == {"decode_error": 1, "unidentified": 1, "missing": 1}
    assert sorted(Path(p).name for p in counter.examples) == ["gone.jpg", "trunc.jpg", "zero.jpg"]
    assert counter.summary().startswith("skipped 3 of 13 images: ")


def test_too_much_bad_data_aborts_with_summary(tmp_path: Path) -> None:
    table = _bad_table(tmp_path, 42, {f"z{i}.jpg": "zero" for i in range(18)})  # 30 % bad
    counter = SkipCounter()
    counter.update(collate([PairDataset(table, PRE, TOK)[i] for i in (0, 42)]))
    counter.check(0.05)  # 1 of 2: too early to judge
    with pytest.raises(DataError, match=r"% > max_bad_fraction 5\.0%\): skipped \d+ of 5\d images: unidentified"):
        for batch in make_loader(PairDataset(table, PRE, TOK), batch_size=10, shuffle=True):
            counter.update(batch)
            counter.check(0.05)  # aborts once >= 50 samples were seen, not after all 60


def test_skip_counter_round_trip() -> None:
    c = SkipCounter(max_examples=2)
    for i, reason in enumerate(["missing", "decode_error", "decode_error"]):
        c.add(f"{i}.jpg", reason)
    c.update({"index": torch.arange(7), "skipped": [], "shard_errors": [("s.tar", "ReadError")]})
    assert c.summary() == ("skipped 3 of 10 images: decode_error 2, missing 1; first: 0.jpg, 1.jpg; "
                           "1 unreadable shard(s): s.tar")
    assert SkipCounter.from_dict(json.loads(json.dumps(c.to_dict()))).to_dict() == c.to_dict()
    with pytest.raises(DataError):
        c.check(0.1, final=True)


def test_collate_all_skipped_and_seeded_order(tmp_path: Path) -> None:
    out = collate([{"skip": ("a.jpg", "missing"), "index": 0}])
    assert out["index"].numel() == 0 and out["skipped"] == [("a.jpg", "missing")]
    ds = PairDataset(_bad_table(tmp_path, 8, {}), PRE, TOK)
    order = [[b["index"].tolist() for b in make_loader(ds, 3, shuffle=True, seed=s)] for s in (7, 7, 8)]
    assert order[0] == order[1] != order[2]


def test_make_loader_takes_a_sampler_or_batch_sampler_and_leaves_the_global_rng_alone(tmp_path: Path) -> None:
    ds = PairDataset(_bad_table(tmp_path, 8, {}), PRE, TOK)
    batches = [[5, 1], [7, 0, 2]]
    assert [b["index"].tolist() for b in make_loader(ds, batch_sampler=batches, num_workers=1)] == batches
    by_sampler = make_loader(ds, 3, sampler=[6, 4, 2, 0, 1], drop_last=True, pin_memory=False)
    before = torch.get_rng_state()
    assert [b["index"].tolist() for b in by_sampler] == [[6, 4, 2]]
    assert torch.equal(torch.get_rng_state(), before)  # workers are seeded from the loader's own generator
    decoded = make_loader(ds, 4, collate_fn=list)
    assert [len(b) for b in decoded] == [4, 4] and "pixels" in next(iter(decoded))[0]


# ------------------------------------------------------------------------------------------ tar shards


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def _shard(path: Path, keys: list[str]) -> Path:
    with tarfile.open(path, "w") as tar:
        for i, key in enumerate(keys):
            _add(tar, f"{key}.png", _png_bytes(COLORS[i % len(COLORS)]))
            _add(tar, f"{key}.txt", f"caption {key}".encode())
    return path


def test_tar_shards_stream_with_brace_expansion_and_workers(tmp_path: Path) -> None:
    for s in range(3):
        _shard(tmp_path / f"shard-{s:03d}.tar", [f"s{s}k{k}" for k in range(3)])
    ds = TarShardDataset(str(tmp_path / "shard-{000..002}.tar"), PRE, TOK)
    items = _items(ds)
    assert [x["key"].rsplit(":", 1)[1] for x in items] == [f"s{s}k{k}" for s in range(3) for k in range(3)]
    assert items[0]["pixels"].shape == (3, S, S)
    assert torch.equal(items[4]["input_ids"], TOK(["caption s1k1"])["input_ids"][0])
    keys = [k for b in make_loader(ds, batch_size=2, num_workers=2) for k in b["keys"]]
    assert sorted(keys) == sorted(x["key"] for x in items)  # each shard read by exactly one worker


def _malicious_shard(path: Path, cut_in: str) -> Path:
    with tarfile.open(path, "w") as tar:
        _add(tar, "ok.png", _png_bytes("red"))
        _add(tar, "ok.txt", b"fine")
        for name in ("../escape", "/tmp/abs_evil"):
            _add(tar, f"{name}.png", _png_bytes("blue"))
            _add(tar, f"{name}.txt", b"evil")
        link = tarfile.TarInfo("link.png")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
        _add(tar, "link.txt", b"passwd")
        _add(tar, "dup.png", _png_bytes("green"))
        _add(tar, "dup.png", b"not an image")
        _add(tar, "dup.txt", b"duplicate")
        _add(tar, "last.png", _png_bytes("white") * 30)
        _add(tar, "last.txt", b"truncated")
    with tarfile.open(path) as tar:
        last = tar.getmember("last.png")
        cut = {"data": last.offset_data + 100, "header": last.offset + 100, "boundary": last.offset}[cut_in]
    path.write_bytes(path.read_bytes()[:cut])
    return path


@pytest.mark.parametrize("cut_in", ["data", "header", "boundary"])  # tarfile alone ends silently on the last two
def test_malicious_tar_writes_nothing_and_next_shard_is_read(tmp_path: Path, monkeypatch, cut_in: str) -> None:
    shards = tmp_path / "shards"
    shards.mkdir()
    _malicious_shard(shards / "a.tar", cut_in)
    _shard(shards / "b.tar", ["b0", "b1"])
    monkeypatch.chdir(shards)
    for name in ("extract", "extractall", "makefile", "makelink"):
        monkeypatch.setattr(tarfile.TarFile, name, lambda *a, **k: pytest.fail("a tar member was extracted"))
    before = sorted(tmp_path.parent.rglob("*"))
    counter, keys = SkipCounter(), []
    for batch in make_loader(TarShardDataset([shards / "a.tar", shards / "b.tar"], PRE, TOK), batch_size=3):
        counter.update(batch)
        keys += [k.rsplit(":", 1)[1] for k in batch["keys"]]
    assert keys == ["ok", "dup", "b0", "b1"]  # the duplicate key kept its first image
    assert counter.shard_errors == 1 and counter.bad_shards == [str(shards / "a.tar")]
    assert dict(counter.by_reason) == {"no_image": 1}  # link.txt without its symlinked image
    assert sorted(tmp_path.parent.rglob("*")) == before
    assert not Path("/tmp/abs_evil.png").exists() and not (tmp_path / "escape.png").exists()


@pytest.mark.parametrize("spec", ["pipe:touch {tmp}/owned", "http://x/'; touch {tmp}/owned; '.tar",
                                  "{tmp}/a.tar; touch {tmp}/owned", "gs://bucket/shard-{{000..001}}.tar"])
def test_shard_spec_injection_is_rejected(tmp_path: Path, spec: str) -> None:
    spec = spec.format(tmp=tmp_path)
    with pytest.raises(DataError, match="allow_pipe"):
        TarShardDataset(spec, PRE, TOK)
    with pytest.raises(DataError):  # as a shard spec (refused) or as a table path (not found), never a shell
        pair_dataset(spec, PRE, TOK)
    assert not (tmp_path / "owned").exists()


def test_pipe_spec_runs_only_when_allowed(tmp_path: Path) -> None:
    _shard(tmp_path / "a.tar", ["k0"])
    ds = TarShardDataset(f"pipe:cat {tmp_path}/a.tar", PRE, TOK, allow_pipe=True)
    assert [x["key"] for x in ds] == [f"pipe:cat {tmp_path}/a.tar:k0"]
    with pytest.raises(DataError, match="none of the 2 shard"):
        TarShardDataset(str(tmp_path / "missing-{0..1}.tar"), PRE, TOK)
    assert isinstance(pair_dataset(tmp_path / "a.tar", PRE, TOK), TarShardDataset)
    assert expand_shards([tmp_path / "a.tar"]) == [str(tmp_path / "a.tar")]


def test_seeded_cpu_rng_draws_as_manual_seed_and_restores_the_state() -> None:
    from clipkit.data.samples import seeded_cpu_rng

    torch.manual_seed(123)
    want = torch.rand(5)
    before = torch.get_rng_state()
    with seeded_cpu_rng(123):
        got = torch.rand(5)
    assert torch.equal(got, want) and torch.equal(torch.get_rng_state(), before)
