"""Each script in examples/ runs end to end on tiny inputs, so the examples cannot rot."""
from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import clipkit
from clipkit.model.factory import resolve_config

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
COLOURS = ["red", "green", "blue", "yellow"]
SHAPES = ["circle", "square", "triangle"]


def run_example(name: str, *argv: object) -> int:
    """Import `examples/NAME.py` by path and call its `main(argv)`."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module: ModuleType = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main([str(a) for a in argv])


def draw_shape(colour: str, shape: str, size: int = 48) -> Image.Image:
    img = Image.new("RGB", (size, size), "white")
    box, draw = (8, 8, size - 8, size - 8), ImageDraw.Draw(img)
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([(size // 2, 8), (size - 8, size - 8), (8, size - 8)], fill=colour)
    return img


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    """12 coloured shapes in `images/`, `train.csv` of all of them and `val.csv` of 6 (relative paths)."""
    root = tmp_path_factory.mktemp("shapes")
    (root / "images").mkdir()
    rows = []
    for colour in COLOURS:
        for shape in SHAPES:
            name = f"images/{colour}_{shape}.png"
            draw_shape(colour, shape).save(root / name)
            rows.append({"image": name, "caption": f"a {colour} {shape}"})
    for fname, subset in (("train.csv", rows), ("val.csv", rows[::2])):
        with open(root / fname, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, ["image", "caption"])
            writer.writeheader()
            writer.writerows(subset)
    return root


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A random clipkit model a few hundred KB in size (32 px, 2+1 layers, 32-d embeddings)."""
    cfg = resolve_config("tiny", image_size=32, depth=2, embed_dim=32)
    cfg.vision.timm_kwargs.update(embed_dim=48, num_heads=2)
    cfg.text.hf_config.update(hidden_size=48, intermediate_size=96, num_hidden_layers=1, num_attention_heads=2,
                              vocab_size=300)
    torch.manual_seed(0)
    model, tok = clipkit.create_model_and_tokenizer(cfg)
    return clipkit.save(model.eval(), tok, tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="module")
def open_clip_file(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """A small random open_clip ViT CLIP saved as a plain state dict, and the model itself (the reference)."""
    open_clip = pytest.importorskip("open_clip")
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(1)
    oc = open_clip.model.CLIP(  # width 64: clipkit infers heads as width // 64
        32, CLIPVisionCfg(layers=1, width=64, patch_size=8, image_size=32),
        CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=1, layers=1), quick_gelu=False,
    ).eval()
    path = tmp_path_factory.mktemp("open_clip") / "open_clip.pt"
    torch.save(oc.state_dict(), path)
    return path, oc


def pixels(paths: list[Path], size: int) -> torch.Tensor:
    pre = clipkit.Preprocess(clipkit.PreprocessConfig(image_size=size))
    return torch.stack([pre(clipkit.load_image(p)) for p in paths])


def image_files(shapes: Path) -> list[Path]:
    return sorted((shapes / "images").glob("*.png"))


# ---------------------------------------------------------------------------------------------- tests


def test_finetune_csv(shapes, tiny_model, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    rc = run_example("finetune_csv", "--train", shapes / "train.csv", "--val", shapes / "val.csv",
                     "--model", tiny_model, "--out", out, "--max-steps", 3, "--batch-size", 4, "--lock-text")
    assert rc == 0
    assert (out / "model" / "config.json").exists()
    printed = capsys.readouterr().out
    assert f"model saved to {out / 'model'} after 3 steps" in printed
    assert "text_to_image_R@1" in printed
    clipkit.load(out / "model")


@pytest.mark.parametrize("source", ["folder", "csv"])
def test_search_index(shapes, tiny_model, tmp_path, capsys, source: str) -> None:
    images = shapes / "images" if source == "folder" else shapes / "train.csv"
    out = tmp_path / "index"
    assert run_example("search_index", "--model", tiny_model, "--images", images, "--out", out,
                       "--query", "a red circle", "-k", 3) == 0
    assert json.loads((out / "index.json").read_text())["count"] == 12
    hits = [line for line in capsys.readouterr().out.splitlines() if line.endswith(".png")]
    assert len(hits) == 3
    scores = [float(line.split()[0]) for line in hits]
    assert scores == sorted(scores, reverse=True)


def test_zeroshot_folder(shapes, tiny_model, tmp_path) -> None:
    out = tmp_path / "labels.csv"
    classes = ["circle", "square", "triangle"]
    templates = tmp_path / "templates.txt"
    templates.write_text("# shapes\na drawing of a {}\n{}\n", encoding="utf-8")
    assert run_example("zeroshot_folder", "--model", tiny_model, "--images", shapes / "images",
                       "--classes", ",".join(classes), "--templates", templates, "--out", out) == 0
    with open(out, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["image"] for r in rows) == [str(p) for p in image_files(shapes)]
    assert all(r["label"] in classes and 1 / 3 <= float(r["score"]) <= 1 for r in rows)


def test_rerank_samples(shapes, tiny_model, tmp_path, capsys) -> None:
    from clipkit.report.plots import sheet_size

    sheet, ranking = tmp_path / "sheet.png", tmp_path / "ranking.json"
    candidates = image_files(shapes)[:6]
    assert run_example("rerank_samples", "--model", tiny_model, "--prompt", "a red circle", *candidates,
                       "--top", 4, "--sheet", sheet, "--json", ranking) == 0
    assert Image.open(sheet).size == sheet_size(4)
    ranked = json.loads(ranking.read_text())["ranking"]
    assert len(ranked) == 4 and {r["image"] for r in ranked} <= {str(p) for p in candidates}
    assert capsys.readouterr().out.count("#") == 4


def test_load_pretrained_open_clip(shapes, open_clip_file, tmp_path) -> None:
    path, oc = open_clip_file
    out = tmp_path / "converted"
    assert run_example("load_pretrained", "--open-clip", path, "--no-quick-gelu", "--out", out) == 0
    model, preprocess, _ = clipkit.load(out)
    x = pixels(image_files(shapes)[:4], 32)
    assert preprocess.cfg.image_size == 32
    with torch.no_grad():
        np.testing.assert_allclose(model.encode_image(x), oc.encode_image(x, normalize=True), atol=1e-5)


def test_load_pretrained_hf_and_export(shapes, hf_clip_dir, tmp_path) -> None:
    from transformers import CLIPModel as HFCLIPModel

    src, out, export = hf_clip_dir(257), tmp_path / "converted", tmp_path / "hf"
    assert run_example("load_pretrained", "--hf", src, "--out", out, "--export-hf", export) == 0
    (source, _, tok), (converted, _, _) = clipkit.load(src), clipkit.load(out)
    x, tokens = pixels(image_files(shapes)[:4], 32), tok(["a red circle", "a blue square"])
    hf = HFCLIPModel.from_pretrained(str(export)).eval()
    with torch.no_grad():
        np.testing.assert_allclose(converted.encode_image(x), source.encode_image(x), atol=1e-6)
        np.testing.assert_allclose(converted.encode_text(tokens), source.encode_text(tokens), atol=1e-6)
        out = hf.get_image_features(pixel_values=x)  # transformers 5: an output object, features in pooler_output
        exported = torch.nn.functional.normalize(out if torch.is_tensor(out) else out.pooler_output, dim=-1)
        np.testing.assert_allclose(exported, source.encode_image(x), atol=1e-5)


def test_finetune_pretrained_from_an_offline_hub_cache(shapes, tmp_path, monkeypatch, capsys) -> None:
    """The pretrained starting point comes by name from a Hugging Face cache (a tiny random CLIP, offline)."""
    from helpers import hub_repo, make_hf_clip, offline_hub, small_clip_tokenizer

    src, home = tmp_path / "src", tmp_path / "hf_home"
    make_hf_clip(257).save_pretrained(str(src))
    small_clip_tokenizer().save_pretrained(str(src))
    hub_repo(home, "clipkit-test/tiny-clip", {p.name: p for p in src.iterdir()})
    offline_hub(monkeypatch, home)
    reference = shapes / "reference.csv"
    rows = [f"images/{c}_{s}.png,a {c} {s},{s}" for c in COLOURS for s in SHAPES]
    reference.write_text("image,caption,label\n" + "\n".join(rows) + "\n")
    out = tmp_path / "run"
    assert run_example("finetune_pretrained", "--model", "hf-hub:clipkit-test/tiny-clip", "--train",
                       shapes / "train.csv", "--val", shapes / "val.csv", "--reference", reference, "--out", out,
                       "--max-steps", 2, "--batch-size", 4, "--lr", 1e-3, "--wise-ft", 0.5) == 0
    printed = capsys.readouterr().out
    assert "alpha 0 " in printed and "alpha 0.5 " in printed and "alpha 1 " in printed
    assert (out / "wise_ft.png").exists() and (out / "wise_ft" / "alpha_0.5" / "model.safetensors").exists()
    start, _, _ = clipkit.load("hf-hub:clipkit-test/tiny-clip")
    tuned, _, _ = clipkit.load(out / "model")
    a, b = start.state_dict(), tuned.state_dict()
    assert torch.equal(a["visual.blocks.0.attn.qkv.weight"], b["visual.blocks.0.attn.qkv.weight"])  # locked
    assert not torch.equal(a["visual.blocks.1.attn.qkv.weight"], b["visual.blocks.1.attn.qkv.weight"])
