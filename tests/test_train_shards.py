"""Training from streamed tar shards: the same learning as the table, and a SIGKILLed run resumes bit for bit."""
from __future__ import annotations

import json
import signal
import statistics
import subprocess
from pathlib import Path

import pytest

from clipkit.data.shard_writer import write_shards
from clipkit.train import Trainer, TrainingError
import test_train
from test_train import _assert_same, _cfg, _cli_train_args, _crash, _weights

pairs, micro_model = test_train.pairs, test_train.micro_model  # the same fixtures


@pytest.fixture(scope="module")
def shard_spec(pairs, tmp_path_factory) -> str:
    """The 24 pairs as 4 shards of 6, written by `clipkit data shards`' library call."""
    summary = write_shards(pairs, tmp_path_factory.mktemp("shards") / "s", shard_size=6, progress=False)
    assert summary.counts == [6, 6, 6, 6]
    return summary.spec


def _losses(run: Path) -> list[float]:
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in recs if "loss" in r]


def _shard_cfg(spec: str, micro_model: Path, out: Path, **kw):
    """A run on the shards; a buffer of 6 (one shard) by default, so that a resume has to refill it mid-shard."""
    return _cfg(Path(spec), micro_model, out, train_data=spec, **{"shuffle_buffer": 6, **kw})


@pytest.mark.slow
def test_shards_train_like_the_same_data_from_a_table(pairs, micro_model, shard_spec, tmp_path):
    steps = dict(max_steps=24, checkpoint_every=100)  # 8 epochs of 3 batches of 8
    table = Trainer(_cfg(pairs, micro_model, tmp_path / "table", **steps)).fit()
    streamed = Trainer(_shard_cfg(shard_spec, micro_model, tmp_path / "shards", shuffle_buffer=1000, **steps)).fit()
    assert table["steps"] == streamed["steps"] == 24 and streamed["skipped"]["seen"] == 24 * 8
    a, b = _losses(tmp_path / "table"), _losses(tmp_path / "shards")
    assert a[:3] != b[:3]  # another order of the same samples: not the same run
    first, last = statistics.mean(a[:3]), statistics.mean(a[-6:])
    assert last < 0.7 * first and statistics.mean(b[-6:]) < 0.7 * statistics.mean(b[:3])  # both learn
    assert abs(statistics.mean(b[-6:]) - last) < 0.15 * first  # and reach the same loss within noise
    assert not (tmp_path / "shards" / "image_cache").exists()


def _cli(cfg, resume: bool = False, workers: int = 2) -> subprocess.CompletedProcess:
    args = _cli_train_args(cfg, resume) + ["--workers", str(workers), "--shuffle-buffer", str(cfg.shuffle_buffer)]
    return subprocess.run(args, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def shard_reference(shard_spec, micro_model, tmp_path_factory) -> Path:
    """An uninterrupted streamed 9-step run (2 loader workers) in a fresh process, like the crashing ones."""
    out = tmp_path_factory.mktemp("shard_ref") / "run"
    proc = _cli(_shard_cfg(shard_spec, micro_model, out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


@pytest.mark.slow
def test_sigkill_then_resume_on_shards_is_bitwise_equal(shard_spec, micro_model, shard_reference, tmp_path):
    cfg = _shard_cfg(shard_spec, micro_model, tmp_path / "run", num_workers=2)
    crashed = _crash(cfg, "step", 7, tmp_path)  # killed in epoch 2, one step after the step-6 checkpoint
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-2000:]
    assert (tmp_path / "run" / "checkpoints" / "step_00000006").is_dir()
    resumed = _cli(cfg, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from step 6" in resumed.stderr
    _assert_same(_weights(shard_reference), _weights(tmp_path / "run"))
    assert _losses(tmp_path / "run") == _losses(shard_reference)


def test_resume_with_other_loader_workers_is_refused_on_shards(shard_spec, micro_model, tmp_path):
    cfg = _shard_cfg(shard_spec, micro_model, tmp_path / "run", num_workers=2)

    def stop(step: int) -> None:
        if step == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg, on_step=stop).fit()  # leaves the step-3 checkpoint
    cfg.num_workers, cfg.resume = 1, True  # the stream's layout: each worker reads its own shards
    with pytest.raises(TrainingError, match="--workers 2"):
        Trainer(cfg)
