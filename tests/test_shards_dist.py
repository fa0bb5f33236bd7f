"""Two processes under torchrun (gloo, CPU): training from shards and from a table without the image cache keeps
every rank's batch full when an image is corrupt, and `clipkit embed` on 2 ranks equals the single run."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from clipkit.data.shard_writer import write_shards
from clipkit.search.collection import load_collection
import test_train
from test_train import _cfg

pairs, micro_model = test_train.pairs, test_train.micro_model  # the same fixtures

pytestmark = pytest.mark.slow  # each test starts two or three fresh processes

RECORDING_RUN = '''"""Train a JSON TrainConfig, recording the size of every batch this rank trains on."""
import json, os, sys
from clipkit.train import TrainConfig, train, trainer

sizes, original = [], trainer.Trainer._train_step


def recording(self, batch):
    sizes.append(len(batch["index"]))
    return original(self, batch)


trainer.Trainer._train_step = recording
with open(sys.argv[1], encoding="utf-8") as f:
    cfg = TrainConfig(**json.load(f))
summary = train(cfg)
with open(os.path.join(cfg.output, "sizes-%s.json" % os.environ.get("RANK", "0")), "w") as f:
    json.dump({"sizes": sizes, "skipped": summary["skipped"], "steps": summary["steps"]}, f)
'''

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]


def _run_two(cfg, tmp_path: Path) -> list[dict]:
    program, config = tmp_path / "recording_run.py", tmp_path / "recording_run.json"
    program.write_text(RECORDING_RUN)
    config.write_text(json.dumps(dataclasses.asdict(cfg)))
    proc = subprocess.run(_torchrun(str(program), str(config)), capture_output=True, text=True, timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((Path(cfg.output) / f"sizes-{r}.json").read_text()) for r in range(2)]


@pytest.fixture
def corrupt_pairs(pairs, tmp_path) -> Path:
    """The 24 pairs with one image replaced by an HTML error page."""
    data = tmp_path / "data"
    shutil.copytree(pairs.parent, data)
    (data / "green_square_0.png").write_bytes(b"<html>404</html>")
    return data / "train.csv"


def test_two_gloo_processes_train_from_shards_with_a_corrupt_image(corrupt_pairs, micro_model, tmp_path):
    written = write_shards(corrupt_pairs, tmp_path / "shards", shard_size=5, progress=False)  # bytes as they are
    spec = written.spec  # 5 shards (5, 5, 5, 5, 4): each pass, one rank reads 3 of them and the other 2
    cfg = _cfg(corrupt_pairs, micro_model, tmp_path / "run", train_data=spec, batch_size=4, max_steps=6,
               checkpoint_every=100, max_bad_fraction=0.2)
    ranks = _run_two(cfg, tmp_path)
    assert [r["sizes"] for r in ranks] == [[4] * 6, [4] * 6]  # both ranks full: the bad sample was replaced
    skipped = ranks[0]["skipped"]  # every rank's counts, merged
    assert skipped == ranks[1]["skipped"] and set(skipped["by_reason"]) == {"unidentified"}
    assert skipped["by_reason"]["unidentified"] >= 1 and skipped["seen"] == 2 * 6 * 4 + skipped["skipped"]
    assert written.counts == [5, 5, 5, 5, 4] and (tmp_path / "run" / "model" / "model.safetensors").is_file()


def test_two_gloo_processes_without_the_image_cache_keep_batches_full(corrupt_pairs, micro_model, tmp_path):
    """Issue 11 item 14: one rank meets the corrupt image; before, its batch shrank to 3 and the all-gather failed."""
    cfg = _cfg(corrupt_pairs, micro_model, tmp_path / "run", batch_size=4, max_steps=3, checkpoint_every=100,
               cache_images=False, max_bad_fraction=0.2)  # 3 steps of 2 x 4 = one epoch of the 24 rows
    ranks = _run_two(cfg, tmp_path)
    assert [r["sizes"] for r in ranks] == [[4, 4, 4], [4, 4, 4]]
    skipped = ranks[0]["skipped"]
    assert skipped["by_reason"] == {"unidentified": 1} and skipped["seen"] == 25  # 24 trained on + the bad one
    assert skipped["examples"] == [str(corrupt_pairs.parent / "green_square_0.png")]


def test_embed_under_torchrun_equals_the_single_run(pairs, micro_model, tmp_path):
    args = ["-m", "clipkit.cli", "embed", "--model", str(micro_model), "--images", str(pairs), "--shard-size", "4",
            "--workers", "0", "--dtype", "float32", "--quiet", "--out"]
    one = subprocess.run([sys.executable, *args, str(tmp_path / "one")], capture_output=True, text=True, timeout=300,
                         env=ENV)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run(_torchrun(*args, str(tmp_path / "two")), capture_output=True, text=True, timeout=600,
                         env=ENV)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "shard 0/2: wrote 3 chunk(s)" in two.stdout and "shard 1/2: wrote 3 chunk(s)" in two.stdout
    for texts in (False, True):
        (a, meta_a), (b, meta_b) = (load_collection(tmp_path / d, texts=texts) for d in ("one", "two"))
        assert meta_a["id"].tolist() == meta_b["id"].tolist() == list(range(24))
        assert meta_a["image"].tolist() == meta_b["image"].tolist()
        assert np.array_equal(a, b)  # the same batches on the same model: the same bits
