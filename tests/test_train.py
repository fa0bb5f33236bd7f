"""Trainer: outputs, exact resume after SIGKILL (also inside a save), config checks, bad data, gradient cache."""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file

import clipkit
from clipkit.errors import CheckpointError, ClipkitError, DataError
from clipkit.model import config as model_config
from clipkit.model.factory import resolve_config
from clipkit.train import TrainConfig, Trainer, TrainingError

CRASHING_RUN = '''"""Train the run of a JSON TrainConfig, SIGKILLing this process after step N or inside the save of step N."""
import json
import os
import signal
import sys

from clipkit.train import TrainConfig, train

config, where, at = sys.argv[1], sys.argv[2], int(sys.argv[3])


def kill():
    os.kill(os.getpid(), signal.SIGKILL)


def after_step(step):
    if where == "step" and step == at:
        kill()


def in_save(tmp, step):
    if where == "save" and step == at:
        state = tmp / "train_state.pt"
        state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])  # a half-written file
        kill()


with open(config, encoding="utf-8") as f:
    train(TrainConfig(**json.load(f)), on_step=after_step, on_save=in_save)
'''

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 70, 220), "yellow": (240, 210, 20)}
SHAPES = ("circle", "square", "triangle")


def _shape(kind: str, colour: tuple[int, int, int], size: int = 40) -> Image.Image:
    img = Image.new("RGB", (size, size), "white")
    d = ImageDraw.Draw(img)
    box = (6, 6, size - 6, size - 6)
    if kind == "triangle":
        d.polygon([(size // 2, 6), (size - 6, size - 6), (6, size - 6)], fill=colour)
    else:
        (d.ellipse if kind == "circle" else d.rectangle)(box, fill=colour)
    return img


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    """24 captioned shape images (12 concepts x 2 sizes of jitter) with a `label` column."""
    root = tmp_path_factory.mktemp("pairs")
    rows = []
    for colour, rgb in COLOURS.items():
        for kind in SHAPES:
            for v in range(2):
                name = f"{colour}_{kind}_{v}.png"
                _shape(kind, tuple(max(0, c - 30 * v) for c in rgb)).save(root / name)
                rows.append(f"{name},a {colour} {kind},{kind}")
    (root / "train.csv").write_text("image,caption,label\n" + "\n".join(rows) + "\n")
    return root / "train.csv"


@pytest.fixture(scope="module")
def micro_model(tmp_path_factory) -> Path:
    """A clipkit model small enough to train for a few steps in well under a second each."""
    cfg = resolve_config("tiny", image_size=32, depth=2, embed_dim=32)
    cfg.vision.timm_kwargs.update(embed_dim=48, num_heads=2)
    cfg.text.hf_config.update(hidden_size=48, intermediate_size=96, num_hidden_layers=1, num_attention_heads=2, vocab_size=300)
    model, tok = clipkit.create_model_and_tokenizer(cfg)
    return clipkit.save(model, tok, tmp_path_factory.mktemp("micro") / "model")


def _cfg(pairs: Path, micro_model: Path, out: Path, **kw) -> TrainConfig:
    base = dict(train_data=str(pairs), output=str(out), model=str(micro_model), batch_size=8, max_steps=9,
                lr=1e-3, warmup_steps=2, checkpoint_every=3, log_every=1, progress=False, seed=3)
    return TrainConfig(**{**base, **kw})


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model" / "model.safetensors"))


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    unequal = [k for k in a if not torch.equal(a[k], b[k])]
    assert not unequal, f"{len(unequal)} tensors differ, e.g. {unequal[:3]}"


def _cli_train_args(cfg: TrainConfig, resume: bool = False) -> list[str]:
    args = [sys.executable, "-m", "clipkit.cli", "train", "--train-data", cfg.train_data, "--model", cfg.model,
            "--output", cfg.output, "--batch-size", str(cfg.batch_size), "--max-steps", str(cfg.max_steps),
            "--lr", str(cfg.lr), "--warmup-steps", str(cfg.warmup_steps), "--seed", str(cfg.seed),
            "--checkpoint-every", str(cfg.checkpoint_every), "--keep-checkpoints", str(cfg.keep_checkpoints),
            "--log-every", "1", "--quiet"]
    return args + (["--resume"] if resume else [])


def _cli_train(cfg: TrainConfig, resume: bool = False) -> subprocess.CompletedProcess:
    """Train in a fresh process, as a user would."""
    return subprocess.run(_cli_train_args(cfg, resume), capture_output=True, text=True, timeout=300)


def _crash(cfg: TrainConfig, where: str, step: int, tmp_path: Path) -> subprocess.CompletedProcess:
    """Train `cfg` in a fresh process that SIGKILLs itself after `step` (where="step") or inside its save ("save")."""
    program, config = tmp_path / "crashing_run.py", tmp_path / "crashing_run.json"
    program.write_text(CRASHING_RUN)
    config.write_text(json.dumps(dataclasses.asdict(cfg)))
    return subprocess.run([sys.executable, str(program), str(config), where, str(step)], capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def reference(pairs, micro_model, tmp_path_factory) -> Path:
    """An uninterrupted 9-step run that the crash-and-resume runs must reproduce bit for bit.

    It runs in a subprocess like them: process-global state (OpenMP thread counts that other tests
    change, e.g. through faiss) alters float reduction order, and bitwise equality needs equal runs.
    """
    out = tmp_path_factory.mktemp("ref") / "run"
    proc = _cli_train(_cfg(pairs, micro_model, out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "saved step 6 to" in proc.stderr and "trained 9 steps" in proc.stdout  # the CLI shows the log lines
    return out


def test_run_writes_model_metrics_plot_and_checkpoints(reference):
    for name in ("model/model.safetensors", "metrics.jsonl", "loss_curve.png", "summary.json", "train_config.json"):
        assert (reference / name).exists(), name
    assert (reference / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    recs = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if "loss" in r] == list(range(1, 10))
    assert all(r["samples_per_s"] > 0 for r in recs)
    lrs = [r["lr"] for r in recs]
    assert lrs[1] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(0.0, abs=1e-12)  # warmup 2, cosine to 0
    assert sorted(p.name for p in (reference / "checkpoints").iterdir()) == ["step_00000006", "step_00000009"]
    model, _, tok = clipkit.load(reference / "model")  # the final model is a normal clipkit directory
    assert model.encode_text(tok(["a red circle"])).shape == (1, 32)


def test_loss_goes_down(pairs, micro_model, tmp_path):
    Trainer(_cfg(pairs, micro_model, tmp_path / "run", max_steps=24, lr=3e-3, checkpoint_every=100)).fit()
    losses = [json.loads(x)["loss"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.3


def test_sigkill_then_resume_is_bitwise_equal(pairs, micro_model, reference, tmp_path):
    cfg = _cfg(pairs, micro_model, tmp_path / "run")
    crashed = _crash(cfg, "step", 7, tmp_path)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-2000:]
    with open(tmp_path / "run" / "metrics.jsonl", "a") as log:  # the kill also tore a line of the log
        log.write('{"step": 8, "lo')
    resumed = _cli_train(cfg, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from step 6" in resumed.stderr
    _assert_same(_weights(reference), _weights(tmp_path / "run"))
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()  # step 7 ran twice, is logged once
    assert [json.loads(x)["step"] for x in lines] == [json.loads(x)["step"] for x in
                                                     (reference / "metrics.jsonl").read_text().splitlines()]
    assert (tmp_path / "run" / "loss_curve.png").exists()
    ref_state = torch.load(reference / "checkpoints/step_00000009/train_state.pt", weights_only=True)
    state = torch.load(tmp_path / "run/checkpoints/step_00000009/train_state.pt", weights_only=True)
    assert state["scheduler"]["last_epoch"] == ref_state["scheduler"]["last_epoch"] == 9
    assert state["scheduler"]["_last_lr"] == ref_state["scheduler"]["_last_lr"]


def test_sigkill_inside_a_save_keeps_previous_checkpoint(pairs, micro_model, reference, tmp_path):
    cfg = _cfg(pairs, micro_model, tmp_path / "run")
    crashed = _crash(cfg, "save", 6, tmp_path)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-2000:]
    ckpts = tmp_path / "run" / "checkpoints"
    assert [p.name for p in ckpts.iterdir() if p.name.startswith("step_")] == ["step_00000003"]
    assert any(p.name.endswith(".tmp") for p in ckpts.iterdir()), "the half-written save should be a temp dir"
    resumed = _cli_train(cfg, resume=True)
    assert resumed.returncode == 0 and "resumed from step 3" in resumed.stderr
    assert not any(p.name.endswith(".tmp") for p in ckpts.iterdir())
    _assert_same(_weights(reference), _weights(tmp_path / "run"))


def test_corrupt_newest_checkpoint_is_skipped(pairs, micro_model, reference, tmp_path):
    cfg = _cfg(pairs, micro_model, tmp_path / "run", keep_checkpoints=3)
    assert _crash(cfg, "step", 7, tmp_path).returncode == -signal.SIGKILL
    weights = tmp_path / "run/checkpoints/step_00000006/model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])
    resumed = _cli_train(cfg, resume=True)
    assert resumed.returncode == 0 and "resumed from step 3" in resumed.stderr
    assert "skipping unreadable/unchecked checkpoint step_00000006" in resumed.stderr
    _assert_same(_weights(reference), _weights(tmp_path / "run"))


def test_negative_control_resume_without_scheduler_diverges(pairs, micro_model, reference, tmp_path):
    """Proves the equality checks above can fail: a resume that skips one piece of state diverges."""
    cfg = _cfg(pairs, micro_model, tmp_path / "run")
    assert _crash(cfg, "step", 7, tmp_path).returncode == -signal.SIGKILL
    skip_scheduler = ("import sys, torch\n"
                      "torch.optim.lr_scheduler.LambdaLR.load_state_dict = lambda self, state: None\n"
                      "from clipkit.cli import main\nsys.exit(main(sys.argv[1:]))")
    args = _cli_train_args(cfg, resume=True)
    proc = subprocess.run([sys.executable, "-c", skip_scheduler, *args[3:]], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "resumed from step 6" in proc.stderr, proc.stderr[-2000:]
    with pytest.raises(AssertionError, match="tensors differ"):
        _assert_same(_weights(reference), _weights(tmp_path / "run"))


def test_resume_with_changed_config_is_refused(pairs, micro_model, tmp_path):
    Trainer(_cfg(pairs, micro_model, tmp_path / "run", max_steps=3)).fit()
    run_files = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()}
    with pytest.raises(TrainingError, match=r"lr: 0.001 -> 0.002") as refused:
        Trainer(_cfg(pairs, micro_model, tmp_path / "run", max_steps=3, lr=2e-3, resume=True))
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()} == run_files  # untouched
    assert "resume_ignore_config=True" in str(refused.value) and "--" not in str(refused.value)  # no CLI flags
    Trainer(_cfg(pairs, micro_model, tmp_path / "run", max_steps=3, lr=2e-3, resume=True, resume_ignore_config=True))


def test_nonfinite_losses_stop_the_run_and_no_bad_checkpoint_is_written(pairs, micro_model, tmp_path):
    trainer = Trainer(_cfg(pairs, micro_model, tmp_path / "run", max_steps=20, checkpoint_every=2, max_nonfinite=3))
    real_loss, calls = trainer.loss_fn, {"n": 0}

    def loss_going_bad(*args):
        calls["n"] += 1
        value = real_loss(*args)
        return value * float("nan") if calls["n"] > 4 else value

    trainer.loss_fn = loss_going_bad
    with pytest.raises(TrainingError, match=r"non-finite loss at step 7, 3 steps in a row.*step_00000006"):
        trainer.fit()
    for ckpt in (tmp_path / "run" / "checkpoints").glob("step_*"):
        assert all(torch.isfinite(t).all() for t in load_file(str(ckpt / "model.safetensors")).values())


def test_corrupt_and_missing_images_are_skipped_and_reported(pairs, micro_model, tmp_path, caplog):
    data = tmp_path / "data"
    shutil.copytree(pairs.parent, data)
    (data / "red_circle_0.png").write_bytes((data / "red_circle_0.png").read_bytes()[:60])
    (data / "blue_square_1.png").unlink()
    with caplog.at_level(logging.WARNING, logger="clipkit.train"):
        summary = Trainer(_cfg(data / "train.csv", micro_model, tmp_path / "run", max_steps=3, max_bad_fraction=0.2)).fit()
    assert summary["skipped"]["skipped"] == 2
    assert summary["skipped"]["by_reason"] == {"decode_error": 1, "missing": 1}
    assert any("skipped 2 of 24 images" in r.getMessage() for r in caplog.records if r.name == "clipkit.train")
    with pytest.raises(DataError, match="too much bad data"):
        Trainer(_cfg(data / "train.csv", micro_model, tmp_path / "run2", max_steps=3, max_bad_fraction=0.05))


def test_gradient_cache_trains_like_the_plain_batch(pairs, micro_model, tmp_path):
    # the same arithmetic in another order: equal to fp32 rounding (bf16 autocast would round each order apart)
    Trainer(_cfg(pairs, micro_model, tmp_path / "plain", max_steps=3, precision="fp32")).fit()
    Trainer(_cfg(pairs, micro_model, tmp_path / "cached", max_steps=3, grad_cache_chunk=3, precision="fp32")).fit()
    a, b = _weights(tmp_path / "plain"), _weights(tmp_path / "cached")
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < 1e-5


def test_locked_text_tower_stays_fixed_and_siglip_trains(pairs, micro_model, tmp_path):
    Trainer(_cfg(pairs, micro_model, tmp_path / "run", max_steps=3, lock_text=True, loss="siglip")).fit()
    before, after = load_file(str(micro_model / "model.safetensors")), _weights(tmp_path / "run")
    text = [k for k in before if k.startswith("text.")]
    assert text and all(torch.equal(before[k], after[k]) for k in text)
    assert not torch.equal(before["text_proj.weight"], after["text_proj.weight"])
    assert "logit_bias" in after


def test_wise_ft_mixes_initial_and_finetuned_weights(pairs, micro_model, tmp_path):
    """One mixing weight is a sweep of one: RUN/model is the fine-tuned model, the mix is RUN/wise_ft/alpha_0.5."""
    run = tmp_path / "run"
    summary = Trainer(_cfg(pairs, micro_model, run, max_steps=3, val_data=str(pairs), wise_ft=0.5,
                           reference_data=str(pairs))).fit()
    init, tuned = load_file(str(micro_model / "model.safetensors")), _weights(run)
    mixed = load_file(str(run / "wise_ft/alpha_0.5/model.safetensors"))
    k = "visual_proj.weight"
    assert torch.allclose(mixed[k], 0.5 * init[k] + 0.5 * tuned[k], atol=1e-6) and not torch.equal(init[k], tuned[k])
    report = summary["wise_ft"]
    assert report["alphas"] == [0.5] and [r["alpha"] for r in report["rows"]] == [0.0, 0.5, 1.0]
    assert all("top1" in r["val"] and "top1" in r["reference"] for r in report["rows"])


@pytest.mark.slow
def test_two_gloo_processes_equal_one_process_with_double_batch(pairs, micro_model, tmp_path):
    # equal to fp32 rounding: bf16 autocast (auto on this kind of CPU) would round the two batch layouts apart
    one = _cfg(pairs, micro_model, tmp_path / "one", batch_size=8, max_steps=3, checkpoint_every=100, precision="fp32")
    Trainer(one).fit()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "clipkit.cli",
           "train", "--train-data", str(pairs), "--model", str(micro_model), "--output", str(tmp_path / "two"),
           "--batch-size", "4", "--max-steps", "3", "--lr", "0.001", "--warmup-steps", "2", "--seed", "3",
           "--checkpoint-every", "100", "--precision", "fp32", "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < 1e-5


def test_without_the_image_cache_bad_images_are_counted_per_batch(pairs, micro_model, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(pairs.parent, data)
    (data / "green_square_0.png").write_bytes(b"<html>404</html>")
    summary = Trainer(_cfg(data / "train.csv", micro_model, tmp_path / "run", max_steps=3, batch_size=8,
                           cache_images=False, max_bad_fraction=0.5)).fit()  # 3 batches of 8 = one epoch of 24
    assert summary["skipped"]["by_reason"] == {"unidentified": 1}
    assert summary["skipped"]["seen"] == 25  # 24 trained on (the bad row replaced by another: full batches) + 1
    assert not (tmp_path / "run" / "image_cache").exists()


def test_val_templates_reach_the_zero_shot_metric_and_survive_resume(pairs, micro_model, tmp_path):
    templates = ("a {} shape", "a drawing of a {}", "{}")  # the library default has two
    cfg = _cfg(pairs, micro_model, tmp_path / "run", max_steps=3, val_data=str(pairs), val_templates=templates)
    summary = Trainer(cfg).fit()
    assert summary["val"]["num_templates"] == 3 and "top1" in summary["val"]
    saved = json.loads((tmp_path / "run" / "train_config.json").read_text())["val_templates"]
    assert saved == list(templates)  # JSON has no tuples ...
    assert Trainer(dataclasses.replace(cfg, resume=True)).pos.step == 3  # ... and that is not a config change
    with pytest.raises(TrainingError, match="val_templates"):
        Trainer(dataclasses.replace(cfg, resume=True, val_templates=("{}",)))
    with pytest.raises(ValueError, match="exactly one"):
        TrainConfig(train_data="t.csv", output="out", val_templates=("no slot for the class",))


def test_scratch_clip_text_tower_is_bound_to_its_caption_tokenizer(pairs, tmp_path, monkeypatch):
    """Regression: a fresh CLIP text tower of OpenAI's vocabulary size (its default tokenizer ends text with 49407)
    trains a caption BPE (end-of-text id 2); the model config must follow the new tokenizer, or `encode_text` on
    raw ids pools at the wrong token and the Hugging Face export guard against id 2 is bypassed."""
    cfg = resolve_config("tiny", image_tower="vit_base_patch32_clip_224", image_size=32, embed_dim=32)  # exportable
    cfg.vision.timm_kwargs.update(embed_dim=48, depth=1, num_heads=2, patch_size=8)
    cfg.text.hf_config.update(hidden_size=48, intermediate_size=96, num_hidden_layers=1, num_attention_heads=2,
                              vocab_size=49408)
    monkeypatch.setitem(model_config.PRESETS, "tiny-openai-vocab", lambda: copy.deepcopy(cfg))
    run = tmp_path / "run"
    Trainer(TrainConfig(train_data=str(pairs), output=str(run), model="tiny-openai-vocab", batch_size=8, max_steps=2,
                        warmup_steps=1, progress=False)).fit()
    model, _, tok = clipkit.load(run / "model")
    assert tok.eot_token_id == 2 and model.config.text.eot_token_id == 2
    assert model.config.text.hf_config["eos_token_id"] == 2 and model.text.config.eos_token_id == 2
    ids = tok(["a red circle", "a blue square triangle"])
    assert torch.allclose(model.encode_text(ids["input_ids"]), model.encode_text(ids), atol=1e-5)  # raw ids: same token
    with pytest.raises(CheckpointError, match="end-of-text id is 2"):
        clipkit.save_hf(model, tok, tmp_path / "hf")


@pytest.mark.parametrize("augment", ["augment", "style_augment"])
def test_loader_workers_change_nothing_across_epochs(pairs, micro_model, tmp_path, augment):
    """One loader for the whole run: its persistent workers serve every epoch the exact samples (augmented too;
    style augmentation draws per sample in the dataset and is applied per batch in the workers' collate)."""
    for workers in (0, 2):
        Trainer(_cfg(pairs, micro_model, tmp_path / f"w{workers}", max_steps=7, checkpoint_every=100,
                     num_workers=workers, **{augment: True})).fit()  # 3 batches per epoch: 3 epochs
    _assert_same(_weights(tmp_path / "w0"), _weights(tmp_path / "w2"))


def test_wise_ft_sweep_reports_each_weight_on_both_domains(pairs, micro_model, tmp_path):
    """The sweep: 0 (the starting model), each weight, 1 (fine-tuned), on the reference and the validation table, as
    a table and a plot. Its alpha=0 row is the starting model measured on its own, its alpha=1 row the final one."""
    from clipkit.train.validation import evaluate_model

    run = tmp_path / "run"
    templates = ("a {} shape", "{}")
    summary = Trainer(_cfg(pairs, micro_model, run, max_steps=3, val_data=str(pairs), wise_ft=(0.25, 0.5),
                           reference_data=str(pairs), val_templates=templates, lr=3e-3)).fit()
    rows = summary["wise_ft"]["rows"]
    assert [r["alpha"] for r in rows] == [0.0, 0.25, 0.5, 1.0]
    table = pd.read_csv(pairs).assign(image=lambda t: [str(pairs.parent / p) for p in t["image"]])
    for alpha, model_dir in ((0.0, micro_model), (1.0, run / "model"), (0.25, run / "wise_ft/alpha_0.25")):
        model, _, tok = clipkit.load(model_dir)
        direct = evaluate_model(model, tok, torch.device("cpu"), table, templates)
        row = next(r for r in rows if r["alpha"] == alpha)
        assert row["reference"]["top1"] == pytest.approx(direct["top1"]) and row["val"] == pytest.approx(direct)
    md = (run / "wise_ft.md").read_text().strip().splitlines()
    assert len(md) == 2 + 4 and "reference (starting domain) zero-shot top-1" in md[0] and md[4].startswith("| 0.5 |")
    assert Image.open(run / "wise_ft.png").size[0] > 100
    init, quarter, tuned = (load_file(str(d / "model.safetensors")) for d in (micro_model, run / "wise_ft/alpha_0.25",
                                                                              run / "model"))
    k = "text_proj.weight"
    assert torch.allclose(quarter[k], 0.75 * init[k] + 0.25 * tuned[k], atol=1e-6)


def test_partial_locking_trains_only_the_unlocked_groups(pairs, micro_model, tmp_path):
    """`tiny` has a timm ViT (timm's groups: [embeddings], block 0, [block 1 + norm]; its projection always
    trains) and a 1-layer CLIP text transformer ([embeddings], [layer + final norm], projection)."""
    run = tmp_path / "run"
    trainer = Trainer(_cfg(pairs, micro_model, run, max_steps=3, lock_image_unlocked_groups=1,
                           lock_text_unlocked_layers=1, lr_layer_decay=0.5))
    assert trainer.data.text_cache is not None  # the text tower is frozen whole: its features are cached
    trainer.fit()
    before, after = load_file(str(micro_model / "model.safetensors")), _weights(run)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert not {k for k in changed if k.startswith(("visual.blocks.0.", "visual.patch_embed", "visual.cls_token",
                                                    "visual.pos_embed", "text."))}
    assert {"visual.blocks.1.attn.qkv.weight", "visual.norm.weight", "visual_proj.weight", "text_proj.weight"} <= changed


def test_param_groups_layer_decay_and_projection_lr(micro_model):
    from clipkit.train.trainer import param_groups

    model, _, _ = clipkit.load(micro_model)
    model.lock_text_tower()
    lr_of = {}
    for g in param_groups(model, 0.1, 1e-3, layer_decay=0.5, proj_lr=1e-2):
        lr_of.update({id(p): (g["lr"], g["weight_decay"]) for p in g["params"]})
    named = dict(model.named_parameters())
    assert lr_of[id(named["visual.blocks.1.attn.qkv.weight"])] == (1e-3, 0.1)  # the top group
    assert lr_of[id(named["visual.blocks.0.attn.qkv.weight"])] == (5e-4, 0.1)
    assert lr_of[id(named["visual.pos_embed"])] == (2.5e-4, 0.0)
    assert lr_of[id(named["visual_proj.weight"])] == (1e-2, 0.1) and lr_of[id(named["logit_scale"])] == (1e-2, 0.0)
    assert not any(id(p) in lr_of for n, p in named.items() if n.startswith("text."))  # frozen: not optimised
    plain = param_groups(model, 0.1, 1e-3)  # the defaults: one lr, decayed parameters first
    assert [(g["lr"], g["weight_decay"]) for g in plain] == [(1e-3, 0.1), (1e-3, 0.0)]


@pytest.mark.parametrize("bad", [dict(lock_image_unlocked_groups=-1), dict(lr_layer_decay=0.0),
                                 dict(wise_ft=(0.5, 1.5), val_data="v.csv"), dict(wise_ft=0.5)])
def test_fine_tuning_options_are_checked_up_front(bad):
    from clipkit.errors import ClipkitError

    with pytest.raises(ClipkitError):
        TrainConfig(train_data="t.csv", output="out", **bad)


def test_checkpoint_without_manifest_is_not_resumed_from(pairs, micro_model, reference, tmp_path):
    cfg = _cfg(pairs, micro_model, tmp_path / "run", keep_checkpoints=3)
    assert _crash(cfg, "step", 7, tmp_path).returncode == -signal.SIGKILL
    (tmp_path / "run/checkpoints/step_00000006/manifest.json").unlink()
    resumed = _cli_train(cfg, resume=True)
    assert resumed.returncode == 0 and "resumed from step 3" in resumed.stderr, resumed.stderr[-2000:]
    _assert_same(_weights(reference), _weights(tmp_path / "run"))


def test_caption_tokenizer_is_saved_whole_or_not_at_all(pairs, tmp_path, monkeypatch):
    """A save that dies half-way must not leave a tokenizer.json that a resume would then train with."""
    from clipkit.model.tokenizer import Tokenizer

    real_save = Tokenizer.save

    def dying_save(self, directory):
        real_save(self, directory)
        (Path(directory) / "tokenizer.json").write_text('{"truncated": ')
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Tokenizer, "save", dying_save)
    cfg = _cfg(pairs, "tiny", tmp_path / "run", max_steps=1)
    with pytest.raises(OSError, match="No space left"):
        Trainer(cfg)
    assert not (tmp_path / "run" / "tokenizer").exists()
    monkeypatch.setattr(Tokenizer, "save", real_save)
    Trainer(cfg)  # the rerun trains and saves the tokenizer again
    assert json.loads((tmp_path / "run" / "tokenizer" / "tokenizer.json").read_text())["model"]["type"] == "BPE"


def test_validation_keeps_a_locked_text_towers_features(pairs, micro_model):
    """With a text cache, validation runs the locked tower once per string and only the projection again: the
    metrics equal the uncached ones, also after the projection changed."""
    from clipkit.train.validation import evaluate_model

    model, _, tok = clipkit.load(micro_model)
    table = pd.read_csv(pairs).assign(image=lambda t: [str(pairs.parent / p) for p in t["image"]])
    templates = ("a {} shape", "{}")
    cache: dict = {}
    first = evaluate_model(model, tok, torch.device("cpu"), table, templates, cache)
    assert set(table["caption"]) <= set(cache) and first == pytest.approx(
        evaluate_model(model, tok, torch.device("cpu"), table, templates))
    with torch.no_grad():
        model.text_proj.weight.mul_(-1.0).add_(0.1)  # what training the projection does
    plain = evaluate_model(model, tok, torch.device("cpu"), table, templates)
    model.text_pooled = lambda tokens: pytest.fail("the locked tower ran again")
    assert evaluate_model(model, tok, torch.device("cpu"), table, templates, cache) == pytest.approx(plain)


def test_patch_dropout_drops_tokens_in_training_only(pairs, micro_model, tmp_path):
    """FLIP-style patch dropout: half the patch tokens reach the blocks in a training step, all of them in eval;
    the trained model saves and loads as the plain tower (same config, eval outputs of the same weights)."""
    from clipkit.train.setup import set_patch_dropout

    model, _, _ = clipkit.load(micro_model)
    plain = copy.deepcopy(model)
    set_patch_dropout(model, 0.5)
    seen = []
    model.visual.blocks[0].register_forward_hook(lambda m, i, o: seen.append(o.shape[1]))
    x = torch.rand(2, 3, 32, 32)
    model.train()(x)
    model.eval()
    assert torch.equal(model.encode_image(x), plain.eval().encode_image(x))
    patches = model.visual.patch_embed.num_patches
    assert seen == [1 + patches // 2, 1 + patches]  # class token + half the patches, then all of them
    summary = Trainer(_cfg(pairs, micro_model, tmp_path / "run", max_steps=3, patch_dropout=0.5)).fit()
    saved = json.loads((Path(summary["model_dir"]) / "config.json").read_text())
    assert saved == json.loads((micro_model / "config.json").read_text())
    with pytest.raises(ClipkitError, match="patch_dropout"):
        TrainConfig(train_data="t.csv", output="o", patch_dropout=1.0)


def test_unmasked_steps_end_the_run_on_every_patch(pairs, micro_model, tmp_path):
    """FLIP's unmasked tuning: with patch dropout 0.5 and 2 unmasked steps, a 5-step run shows the blocks half the
    patches for 3 steps, then all of them; the switch is decided by the step, so a resumed run makes it too."""
    trainer = Trainer(_cfg(pairs, micro_model, tmp_path / "run", max_steps=5, patch_dropout=0.5, unmasked_steps=2,
                           checkpoint_every=100))
    tokens = []
    trainer.model.visual.blocks[0].register_forward_hook(lambda m, i, o: tokens.append(o.shape[1]))
    trainer.fit()
    patches = trainer.model.visual.patch_embed.num_patches
    assert tokens == [1 + patches // 2] * 3 + [1 + patches] * 2
    with pytest.raises(ClipkitError, match="needs patch_dropout"):
        TrainConfig(train_data="t.csv", output="o", unmasked_steps=10)


def test_patch_dropout_needs_a_vit(pairs, tmp_path):
    cfg = resolve_config("tiny", image_size=32)
    cfg.vision = model_config.VisionConfig("resnet10t", {})
    model, tok = clipkit.create_model_and_tokenizer(cfg)
    from clipkit.train.setup import set_patch_dropout

    with pytest.raises(ClipkitError, match="timm ViT"):
        set_patch_dropout(model, 0.5)


def test_a_run_written_before_a_new_field_still_resumes():
    """A field added later (patch_dropout) is read as its neutral default in an older run's train_config.json."""
    from clipkit.train.config import config_changes, config_dict

    new = config_dict(TrainConfig(train_data="t.csv", output="o"), 1)
    old = {k: v for k, v in new.items() if k != "patch_dropout"}
    assert config_changes(old, new) == []
    assert config_changes(old, {**new, "patch_dropout": 0.5}) == ["patch_dropout: 0.0 -> 0.5"]
