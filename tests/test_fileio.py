"""Atomic writes keep the previous good artifact when a write fails; manifests catch silent corruption."""
from __future__ import annotations

import pytest

from clipkit.errors import ClipkitError
from clipkit.fileio import atomic_dir, atomic_path, verify_manifest, write_json_atomic, write_manifest


def test_failed_atomic_write_keeps_old_file(tmp_path):
    target = tmp_path / "a.json"
    write_json_atomic(target, {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("{half")
            raise RuntimeError("disk full")
    assert target.read_text().strip().startswith("{") and '"v": 1' in target.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_failed_atomic_dir_keeps_old_dir(tmp_path):
    target = tmp_path / "model"
    with atomic_dir(target) as d:
        (d / "w.bin").write_bytes(b"old")
    with pytest.raises(OSError):
        with atomic_dir(target) as d:
            (d / "w.bin").write_bytes(b"new-but-half")
            raise OSError(28, "No space left on device")
    assert (target / "w.bin").read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_atomic_dir_replaces_whole_directory(tmp_path):
    target = tmp_path / "model"
    with atomic_dir(target) as d:
        (d / "stale.txt").write_text("x")
    with atomic_dir(target) as d:
        (d / "w.bin").write_bytes(b"new")
    assert sorted(p.name for p in target.iterdir()) == ["w.bin"]


def test_json_rejects_nan(tmp_path):
    with pytest.raises(ValueError):
        write_json_atomic(tmp_path / "m.json", {"loss": float("nan")})


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_manifest_detects_damage(tmp_path, damage):
    (tmp_path / "weights.bin").write_bytes(bytes(range(256)) * 64)
    write_manifest(tmp_path)
    assert verify_manifest(tmp_path) is True
    p = tmp_path / "weights.bin"
    data = bytearray(p.read_bytes())
    if damage == "flip":
        data[5000:5400] = bytes(b ^ 0xFF for b in data[5000:5400])
        p.write_bytes(bytes(data))
        match = "checksum mismatch"
    elif damage == "truncate":
        p.write_bytes(bytes(data[:100]))
        match = "truncated or corrupt"
    else:
        p.unlink()
        match = "missing"
    with pytest.raises(ClipkitError, match=match):
        verify_manifest(tmp_path)


def test_no_manifest_is_reported_not_raised(tmp_path):
    assert verify_manifest(tmp_path) is False
