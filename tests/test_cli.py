"""The `clipkit` command: every command has --help, bad input exits non-zero with one line."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import clipkit
from clipkit.cli import build_parser, main
from clipkit.model.precision import cpu_has_native_bf16
from helpers import make_emoji_packs, make_multilingual_tower


def test_every_command_has_help(capsys):
    commands = build_parser()._subparsers._group_actions[0].choices
    assert {"demo", "convert", "presets"} <= set(commands)
    for name in commands:
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0
        assert "usage: clipkit" in capsys.readouterr().out


def test_demo_runs_end_to_end_on_a_subset(tmp_path, capsys):
    """Two art styles trained on (OpenMoji, and Noto from an npm pack made here), one held out (a Fluent pack)."""
    from clipkit.data.datasets.emoji import catalog

    items = catalog.load_emoji(40)
    packs = make_emoji_packs(tmp_path / "packs", [e.code for e in items], [catalog.cldr_entry(e)["en"] for e in items])
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--limit", "40", "--max-steps", "2", "--batch-size", "8",
                 "--rerank-prompts", "3", "--styles", "openmoji", "noto", "fluent", "--packs", str(packs),
                 "--distill-steps", "2", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "| unseen emoji | seen styles | chance | unseen style (fluent) | chance |" in printed
    assert "text->image R@1, plain English names" in printed and "clipkit serve --index" in printed
    assert f"threads, {'native' if cpu_has_native_bf16() else 'no native'} bf16: trained in" \
        in printed  # the figures depend on the machine's precision: the table says which
    for name in ("data/train.csv", "data/holdout.csv", "model/model.safetensors", "index/index.faiss", "metrics.json",
                 "report.html", "search_text.png", "search_image.png", "few_shot.png"):
        assert (out / name).exists(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["zeroshot/top1"] <= 1.0 and metrics["zeroshot/chance_top1"] > 0
    for scope in ("test", "style_test"):  # each query set, measured on the seen styles and on the unseen one
        for query in ("name_en", "template_en", "name_ko"):
            assert 0.0 <= metrics[f"{scope}_{query}/text_to_image_R@1"] <= 1.0, (scope, query)
    assert metrics["style_zeroshot/num_samples"] == 40 > metrics["style_test_zeroshot/num_samples"] > 0
    assert metrics["data/holdout"] == "fluent" and metrics["data/styles"] == "openmoji,noto,fluent"
    assert metrics["machine/train_precision"] in ("fp32", "bf16") and metrics["machine/device"]
    config = json.loads((out / "run" / "train_config.json").read_text())
    templates = config["val_templates"]
    assert metrics["zeroshot/num_templates"] == len(templates) == 5 and "an emoji of {}." in templates  # the dataset's
    assert config["style_augment"] and config["model"] == "lite2-minilm" and config["max_steps"] == 2
    assert config["lock_text"] and config["lock_image_unlocked_groups"] == 4 and config["lock_image_freeze_bn_stats"]
    model_cfg = json.loads((out / "model" / "config.json").read_text())
    assert model_cfg["vision"]["timm_name"] == "tf_efficientnet_lite2" and model_cfg["vision"]["pretrained"] is None
    trained = {line.split(",")[0].split("/")[1] for line in (out / "data" / "train.csv").read_text().splitlines()[1:]}
    assert trained == {"openmoji", "noto"}  # the held-out style is never trained on
    assert metrics["index/count"] == 3 * 40 and metrics["train/steps"] == 2
    page = (out / "report.html").read_text()
    assert "data:image/png;base64," in page and "Unseen art style" in page
    model, _, tok = clipkit.load(out / "model")  # the demo's model is a normal clipkit directory
    assert model.encode_text(tok(["a red apple"])).shape[0] == 1
    from clipkit.search import open_search

    assert open_search(out / "index", out / "model")[2] == []  # the index knows the model by its fingerprint
    # the distilled text tower: a normal model dir, the same image tower, at home on the teacher's index
    assert open_search(out / "index", out / "model_multilingual")[2] == []
    assert f"--model {out / 'model_multilingual'}" in printed and "distilled text tower" in printed
    assert metrics["distill/steps"] == 2 and metrics["distill/excluded_emoji"] > 0
    assert 0.0 <= metrics["multilingual_test_name_ko/text_to_image_R@10"] <= 1.0
    assert "before and after distillation" in page


def test_demo_distils_into_a_pretrained_student_tower(tmp_path, capsys):
    """`--distill-student-tower`: the demo's multilingual model gets that text tower (its own tokenizer), and the
    report says so."""
    from clipkit.data.datasets.parallel import parallel_table

    table = parallel_table(("ko",))
    tower = make_multilingual_tower(list(table["en"]) + list(table["text"]), tmp_path / "tower")
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--limit", "24", "--max-steps", "2", "--batch-size", "8",
                 "--rerank-prompts", "2", "--styles", "openmoji", "--holdout", "none", "--distill-steps", "2",
                 "--distill-student-tower", str(tower), "--quiet"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["distill/student"] == str(tower) and metrics["distill/tune"] == "tower"
    student, _, tok = clipkit.load(out / "model_multilingual")
    assert student.config.text.hf_config["model_type"] == "bert"
    assert tok.hf.unk_token_id not in tok(["사과"])["input_ids"][0].tolist()
    assert f"the student was the pretrained text tower {tower}" in (out / "report.html").read_text()
    assert f"--model {out / 'model_multilingual'}" in capsys.readouterr().out


def test_demo_headline_without_a_held_out_style():
    """OpenMoji alone (no npm, no font): the unseen-style column says n/a instead of a number."""
    from clipkit.app.demo import DemoResult

    metrics = {"zeroshot/top1": 0.25, "zeroshot/chance_top1": 0.0125, "data/holdout": ""}
    lines = DemoResult(Path("demo"), metrics, 1.0).headline().splitlines()
    assert lines[0] == "| unseen emoji | seen styles | chance | unseen style (none installed) | chance |"
    assert lines[2] == "| zero-shot subcategory top-1 | 0.2500 | 0.0125 | n/a | n/a |"


def test_convert_bad_path_is_one_line_error(tmp_path, capsys):
    assert main(["convert", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no such file" in err[0]


def test_convert_hf_to_clipkit_and_back(tmp_path, hf_clip_dir):
    out = tmp_path / "ck"
    assert main(["convert", str(hf_clip_dir(257)), "--out", str(out)]) == 0
    assert main(["convert", str(out), "--to", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "config.json").exists() and (out / "manifest.json").exists()


def test_console_script_entry_point():
    proc = subprocess.run([sys.executable, "-m", "clipkit.cli", "presets"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "tiny" in proc.stdout
    vit_l = next(line for line in proc.stdout.splitlines() if line.startswith("ViT-L-14 "))
    assert "patch_size=14 embed_dim=1024 depth=24" in vit_l  # the shape, not only the timm name it starts from
    proc = subprocess.run([sys.executable, "-m", "clipkit.cli", "nosuchcommand"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "invalid choice" in proc.stderr


def test_convert_from_names_the_source_format(tmp_path, hf_clip_dir, capsys):
    """`--from` is checked against what the path holds (it used to be parsed and never read)."""
    src = str(hf_clip_dir(257))
    assert main(["convert", src, "--from", "open_clip", "--out", str(tmp_path / "a")]) == 2
    assert "looks like a hf model, not open_clip" in capsys.readouterr().err
    assert main(["convert", src, "--from", "hf", "--out", str(tmp_path / "b")]) == 0
