"""End to end through `clipkit.cli.main`: embed -> index build -> search, and one-line errors on bad input."""
from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pandas as pd
import pytest

import clipkit
from clipkit.search import collection as col
from clipkit.cli import main

from helpers import random_image

STYLES = ["noto", "openmoji", "noto", "openmoji", "noto", "noto", "openmoji", "noto"]
_LOADED: dict[tuple, clipkit.Embedder] = {}


class _ReusedEmbedder(clipkit.Embedder):
    """Every CLI call loads its model (2-3 s on this busy box); here each model directory is loaded once."""

    def __new__(cls, model, **kw):
        key = (str(model), kw.get("device"), kw.get("precision"))
        if key not in _LOADED:
            _LOADED[key] = super().__new__(cls)
            clipkit.Embedder.__init__(_LOADED[key], model, **kw)
        _LOADED[key].batch_size = kw.get("batch_size", 64)
        return _LOADED[key]

    def __init__(self, *args, **kw) -> None:
        pass


@pytest.fixture(autouse=True)
def reuse_loaded_models(monkeypatch):
    monkeypatch.setattr(col, "Embedder", _ReusedEmbedder)


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> Path:
    """8 PNGs + one corrupt file in a CSV with a `style` column."""
    root = tmp_path_factory.mktemp("imgs")
    rows = []
    for i, style in enumerate(STYLES):
        random_image(100 + i, (36 + 4 * i, 40)).save(root / f"p{i}.png")
        rows.append({"image": f"p{i}.png", "caption": f"picture {i}", "style": style})
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    rows.append({"image": "broken.png", "caption": "broken", "style": "noto"})
    pd.DataFrame(rows).to_csv(root / "pairs.csv", index=False)
    return root / "pairs.csv"


@pytest.fixture(scope="module")
def built(tmp_path_factory, saved_tiny_dir, table):
    """CLI embed + index build once; returns paths and the printed outputs."""
    work = tmp_path_factory.mktemp("cli")
    emb, idx = work / "emb", work / "idx"
    outputs = {}
    for name, argv in (("embed", ["embed", "--model", str(saved_tiny_dir), "--images", str(table), "--out", str(emb),
                                  "--shard-size", "4", "--workers", "0", "--quiet"]),
                       ("index", ["index", "build", "--embeddings", str(emb), "--out", str(idx), "--quiet"])):
        with pytest.MonkeyPatch.context() as mp:
            lines = []
            mp.setattr("builtins.print", lambda *a, **k: lines.append(" ".join(map(str, a))))
            assert main(argv) == 0
        outputs[name] = "\n".join(lines)
    return {"model": saved_tiny_dir, "emb": emb, "idx": idx, **outputs}


def search(built, *args) -> list[str]:
    return ["search", "--index", str(built["idx"]), "--model", str(built["model"]), *args]


def one_line_error(capsys, argv, needle) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err


@pytest.mark.parametrize("argv", [["embed"], ["index"], ["index", "build"], ["search"], ["serve"]])
def test_new_commands_have_help(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0 and "usage: clipkit" in capsys.readouterr().out


def test_embed_and_build_print_summaries(built):
    assert "wrote 3 chunk(s)" in built["embed"] and "8 images" in built["embed"]
    assert "1 unreadable image(s)" in built["embed"] and "id 8" in built["embed"]
    for key in ("factory       Flat", "count         9 (1 failed", "bytes/vector", "build time", "recall@10"):
        assert key in built["index"]


def test_search_text_prints_a_ranked_table(built, capsys):
    assert main(search(built, "--text", "picture 3", "-k", "3")) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split()[:3] == ["rank", "score", "id"] and len(lines) == 4
    assert [ln.split()[0] for ln in lines[1:]] == ["1", "2", "3"]


def test_search_image_json_is_the_service_shape(built, table, capsys):
    assert main(search(built, "--image", str(table.parent / "p2.png"), "-k", "4", "--json")) == 0
    results = json.loads(capsys.readouterr().out)["results"]
    assert len(results) == 4 and results[0]["id"] == 2 and results[0]["score"] > 0.999
    assert set(results[0]) >= {"id", "score", "image", "image_rel", "caption", "style"} and "path" not in results[0]
    assert results[0]["image"] == str(table.parent / "p2.png") and results[0]["image_rel"] == "p2.png" and 8 not in [r["id"] for r in results]


def test_search_filter_rerank_mmr(built, capsys):
    argv = search(built, "--text", "picture", "-k", "8", "--filter", 'style == "noto"', "--json")
    assert main(argv) == 0
    results = json.loads(capsys.readouterr().out)["results"]
    assert {r["style"] for r in results} == {"noto"} and len(results) == 5  # the noto row 8 failed
    assert main(search(built, "--text", "picture", "-k", "3", "--rerank", "2", "--mmr", "0.5", "--json")) == 0
    assert len(json.loads(capsys.readouterr().out)["results"]) == 3


def test_search_precision_reaches_the_model(built, table, capsys):
    """`--precision int8` quantises the image tower: same top hit as fp32, other scores; a bad value is refused."""
    scores = {}
    for precision in ("fp32", "int8"):
        assert main(search(built, "--image", str(table.parent / "p2.png"), "-k", "4", "--json",
                           "--precision", precision)) == 0
        results = json.loads(capsys.readouterr().out)["results"]
        assert results[0]["id"] == 2
        scores[precision] = [r["score"] for r in results]
    assert scores["fp32"] != scores["int8"]
    with pytest.raises(SystemExit):
        main(search(built, "--text", "x", "--precision", "fp64"))


def test_filter_cannot_run_commands(built, tmp_path, capsys):
    """The old `DataFrame.eval` filter ran this payload (`pd` was in scope); the grammar refuses it."""
    sentinel = tmp_path / "owned"
    for attack in (f'@pd.io.common.os.system("touch {sentinel}") == 0', f'@os.system("touch {sentinel}") == 0'):
        one_line_error(capsys, search(built, "--text", "x", "--filter", attack), "invalid filter at position 0")
    assert not sentinel.exists()


def test_on_disk_index_from_the_cli(built, tmp_path, table, capsys):
    argv = ["index", "build", "--embeddings", str(built["emb"]), "--out", str(tmp_path / "od"), "--on-disk",
            "--memory-budget", "1GB", "--quiet"]
    assert main(argv) == 0 and "IVF1,Flat" in capsys.readouterr().out
    query = ["--image", str(table.parent / "p5.png"), "-k", "5", "--json"]
    assert main(["search", "--index", str(tmp_path / "od"), "--model", str(built["model"]), *query]) == 0
    on_disk = json.loads(capsys.readouterr().out)
    assert main(search(built, *query)) == 0
    assert on_disk == json.loads(capsys.readouterr().out)


def test_bad_input_is_a_one_line_error(built, tmp_path, capsys):
    one_line_error(capsys, ["search", "--index", str(tmp_path / "nope"), "--model", str(built["model"]),
                            "--text", "x"], "not an index directory")
    one_line_error(capsys, search(built, "--image", str(tmp_path / "nope.png")), "missing")
    one_line_error(capsys, search(built, "--text", "x", "--filter", "nosuchcolumn == 1"), "no column 'nosuchcolumn'")
    one_line_error(capsys, search(built, "--text", "x", "--filter", "style = 'noto'"), "invalid filter at position 6")
    one_line_error(capsys, ["embed", "--model", str(built["model"]), "--images", str(tmp_path / "nope"),
                            "--out", str(tmp_path / "e")], "no such folder or table")
    one_line_error(capsys, ["index", "build", "--embeddings", str(tmp_path), "--out", str(tmp_path / "i")],
                   "not an embeddings folder")
    for bad in (["embed", "--model", "m", "--images", "i", "--out", "o", "--shard", "2/2"],
                ["index", "build", "--embeddings", "e", "--out", "o", "--memory-budget", "lots"]):
        with pytest.raises(SystemExit) as e:
            main(bad)
        assert e.value.code == 2


def test_index_from_a_model_of_another_dim_is_refused(built, tmp_path, capsys):
    model, tok = clipkit.create_model_and_tokenizer("tiny", embed_dim=64)
    other = clipkit.save(model, tok, tmp_path / "dim64")
    argv = ["search", "--index", str(built["idx"]), "--model", str(other), "--text", "x"]
    one_line_error(capsys, argv, "dim mismatch: index")


def test_incomplete_collection_lists_missing_chunks(built, tmp_path, table, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")  # a torchrun rank, no --shard
    argv = ["embed", "--model", str(built["model"]), "--images", str(table), "--out", str(tmp_path / "e"),
            "--shard-size", "4", "--workers", "0", "--no-captions", "--quiet"]
    assert main(argv) == 0 and "shard 1/2: wrote 1 chunk(s)" in capsys.readouterr().out
    one_line_error(capsys, ["index", "build", "--embeddings", str(tmp_path / "e"), "--out", str(tmp_path / "i")],
                   "missing chunks [0, 2] of 3")


def test_serve_hands_its_arguments_to_the_service(monkeypatch):
    calls = []
    fake = types.ModuleType("clipkit.app.service")
    fake.run_server = lambda *a, **kw: calls.append((a, kw))
    monkeypatch.setitem(sys.modules, "clipkit.app.service", fake)
    monkeypatch.setenv("CLIPKIT_API_KEY", "from-env")
    assert main(["serve", "--index", "i", "--model", "m", "--port", "0"]) == 0
    assert main(["serve", "--index", "i", "--model", "m", "--host", "0.0.0.0", "--api-key", "k"]) == 0
    for _, kw in calls:
        assert callable(kw.pop("on_ready"))  # the CLI prints the URL; the library does not
    base = {"insecure_no_auth": False, "knn_images": False, "allow_image_url": False}
    assert calls == [(("i", "m"), {"host": "127.0.0.1", "port": 0, "api_key": "from-env", **base}),
                     (("i", "m"), {"host": "0.0.0.0", "port": 8000, "api_key": "k", **base})]
    assert main(["serve", "--index", "i", "--model", "m", "--precision", "int8"]) == 0
    assert calls[-1][1]["precision"] == "int8"


def test_serve_key_from_a_file_and_the_options(monkeypatch, tmp_path, capsys):
    calls = []
    fake = types.ModuleType("clipkit.app.service")
    fake.run_server = lambda *a, **kw: calls.append(kw)
    monkeypatch.setitem(sys.modules, "clipkit.app.service", fake)
    monkeypatch.setenv("CLIPKIT_API_KEY", "from-env")
    (tmp_path / "key").write_text("from-file\n")
    argv = ["serve", "--index", "i", "--model", "m", "--api-key-file", str(tmp_path / "key"), "--result-column",
            "caption", "--result-column", "style", "--image-root", "/data", "--max-pixels", "5000000"]
    assert main(argv) == 0 and capsys.readouterr().err == ""
    assert {k: calls[0][k] for k in ("api_key", "result_columns", "image_roots", "max_pixels")} == {
        "api_key": "from-file", "result_columns": ["caption", "style"], "image_roots": ["/data"],
        "max_pixels": 5_000_000}
    assert main(["serve", "--index", "i", "--model", "m", "--api-key", "k"]) == 0
    assert "visible to every user of this machine" in capsys.readouterr().err
    (tmp_path / "empty").write_text("\n")
    one_line_error(capsys, ["serve", "--index", "i", "--model", "m", "--api-key-file", str(tmp_path / "empty")],
                   "is empty")


def test_serve_refuses_a_public_address_without_a_key(capsys, monkeypatch):
    """The real run_server: refused before loading anything, with what to do instead."""
    monkeypatch.delenv("CLIPKIT_API_KEY", raising=False)
    one_line_error(capsys, ["serve", "--index", "no-such-index", "--model", "m", "--host", "0.0.0.0"],
                   "refusing to serve on 0.0.0.0 without an API key")
