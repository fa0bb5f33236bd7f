"""The `clipkit` command: every command has --help, bad input exits non-zero with one line."""
from __future__ import annotations

import subprocess
import sys

import pytest

from clipkit.cli import build_parser, main


@pytest.fixture(scope="module")
def small_hf_dir(tmp_path_factory):
    """A random-initialised transformers CLIPModel directory (what save_pretrained writes)."""
    from transformers import CLIPConfig, CLIPModel

    layer = dict(intermediate_size=128, num_hidden_layers=1, num_attention_heads=2, hidden_size=32)
    cfg = CLIPConfig(text_config=dict(layer, vocab_size=300, max_position_embeddings=16),
                     vision_config=dict(layer, image_size=32, patch_size=8), projection_dim=16)
    path = tmp_path_factory.mktemp("hf")
    CLIPModel(cfg).save_pretrained(path)
    return path


def test_every_command_has_help(capsys):
    commands = build_parser()._subparsers._group_actions[0].choices
    assert {"demo", "convert", "presets"} <= set(commands)
    for name in commands:
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0
        assert "usage: clipkit" in capsys.readouterr().out


def test_demo_smoke_runs_and_round_trips(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "a red circle" in out and "max abs embedding difference 0.0e+00" in out
    assert (tmp_path / "demo" / "model" / "model.safetensors").exists()


def test_convert_bad_path_is_one_line_error(tmp_path, capsys):
    assert main(["convert", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no such file" in err[0]


def test_convert_hf_to_clipkit_and_back(tmp_path, small_hf_dir):
    out = tmp_path / "ck"
    assert main(["convert", str(small_hf_dir), "--out", str(out)]) == 0
    assert main(["convert", str(out), "--to", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "config.json").exists() and (out / "manifest.json").exists()


def test_console_script_entry_point():
    proc = subprocess.run([sys.executable, "-m", "clipkit.cli", "presets"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "tiny" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "clipkit.cli", "nosuchcommand"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "invalid choice" in proc.stderr
