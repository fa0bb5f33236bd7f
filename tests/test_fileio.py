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


# ---- hostile and malformed manifests (issue 11, item 8) ------------------------------------------

import errno  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from clipkit.errors import IndexLoadError  # noqa: E402
from clipkit.fileio import recover_dir, reserve_space, sha256_file  # noqa: E402
from clipkit.search import SearchIndex  # noqa: E402

from helpers import ROOT, run_script  # noqa: E402


def _entry(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def _set_manifest(directory: Path, files: object) -> None:
    (directory / "manifest.json").write_text(json.dumps({"files": files}))


@pytest.fixture
def good_dir(tmp_path) -> Path:
    d = tmp_path / "art"
    d.mkdir()
    (d / "w.bin").write_bytes(b"weights" * 100)
    write_manifest(d)
    return d


def test_manifest_entry_outside_the_directory_is_never_opened(good_dir, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("top secret")
    files = json.loads((good_dir / "manifest.json").read_text())["files"]
    for name in ("../secret.txt", str(secret), "sub/../../secret.txt"):
        _set_manifest(good_dir, {**files, name: _entry(secret)})  # sizes and hashes match: only the name is wrong
        with pytest.raises(ClipkitError, match="not a plain file name"):
            verify_manifest(good_dir)


def test_symlinked_entry_is_refused(good_dir, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("top secret")
    (good_dir / "link.txt").symlink_to(secret)
    files = json.loads((good_dir / "manifest.json").read_text())["files"]
    _set_manifest(good_dir, {**files, "link.txt": _entry(secret)})
    with pytest.raises(ClipkitError, match="symbolic link"):
        verify_manifest(good_dir)
    (good_dir / "manifest.json").unlink()
    (good_dir / "manifest.json").symlink_to(secret)  # the manifest itself must not be a link either
    with pytest.raises(ClipkitError, match="symbolic link"):
        verify_manifest(good_dir)


_HANG_CHECK = textwrap.dedent("""
    import sys
    from clipkit.errors import ClipkitError
    from clipkit.fileio import verify_manifest
    try:
        verify_manifest(sys.argv[1])
    except ClipkitError as e:
        print("refused:", e)
""")


@pytest.mark.parametrize("kind", ["absolute", "symlink", "fifo"])
def test_device_or_pipe_entry_cannot_hang_verification(good_dir, kind):
    """`/dev/zero` as an entry made verification read forever (so `clipkit serve` never started)."""
    files = json.loads((good_dir / "manifest.json").read_text())["files"]
    entry = {"bytes": 0, "sha256": "0" * 64}  # size 0 matches a device's: the old check went on to hash it
    if kind == "absolute":
        files["/dev/zero"] = entry
    elif kind == "symlink":
        (good_dir / "zero").symlink_to("/dev/zero")
        files["zero"] = entry
    else:
        os.mkfifo(good_dir / "pipe")  # nobody writes: opening it for reading would block forever
        files["pipe"] = entry
    _set_manifest(good_dir, files)
    try:
        out = run_script(_HANG_CHECK, good_dir, timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail(f"manifest verification hung on a {kind} entry")
    assert out.returncode == 0 and out.stdout.startswith("refused:"), out.stdout + out.stderr
    assert {"absolute": "not a plain file name", "symlink": "symbolic link", "fifo": "not a regular file"}[kind] \
        in out.stdout


@pytest.mark.parametrize("manifest", [
    {"files": {"w.bin": 5}}, {"files": {"w.bin": {"bytes": "12", "sha256": "0" * 64}}},
    {"files": {"w.bin": {"bytes": 700}}}, {"files": {"w.bin": {"bytes": 700, "sha256": 7}}},
    {"files": {"w.bin": {"bytes": -1, "sha256": "0" * 64}}}, {"files": ["w.bin"]}, {"files": None}, [1, 2],
    {"files": {"": {"bytes": 0, "sha256": "0" * 64}}}, {"files": {"..": {"bytes": 0, "sha256": "0" * 64}}},
], ids=["int-entry", "str-bytes", "no-sha", "int-sha", "negative", "list", "null", "top-list", "empty", "dotdot"])
def test_malformed_manifest_is_a_clipkit_error(good_dir, manifest):
    (good_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IndexLoadError, match=r"manifest\.json: (malformed|unreadable) manifest"):  # never a TypeError
        verify_manifest(good_dir, IndexLoadError)


def test_complete_manifest_refuses_unlisted_files(good_dir):
    (good_dir / "added.json").write_text("{}")
    assert verify_manifest(good_dir) is True  # plain verification only checks what is listed
    with pytest.raises(ClipkitError, match="added.json: not listed"):
        verify_manifest(good_dir, complete=True)
    (good_dir / "added.json").unlink()
    (good_dir / ".DS_Store").write_bytes(b"x")  # hidden files are not read by any loader
    assert verify_manifest(good_dir, complete=True) is True


@pytest.fixture
def index_dir(tmp_path) -> Path:
    x = np.random.default_rng(0).standard_normal((50, 8)).astype(np.float32)
    return SearchIndex.build(x / np.linalg.norm(x, axis=1, keepdims=True), kind="flat").save(tmp_path / "idx")


def test_index_manifest_attacks_are_index_load_errors(index_dir, tmp_path):
    good = json.loads((index_dir / "manifest.json").read_text())["files"]
    secret = tmp_path / "secret.txt"
    secret.write_text("top secret")
    for files, match in (({**good, "../secret.txt": _entry(secret)}, "not a plain file name"),
                         ({**good, "/dev/zero": {"bytes": 1, "sha256": "0" * 64}}, "not a plain file name"),
                         ({**good, "meta.parquet": 3}, "malformed manifest")):
        _set_manifest(index_dir, files)
        with pytest.raises(IndexLoadError, match=match):
            SearchIndex.load(index_dir)
    _set_manifest(index_dir, good)
    SearchIndex.load(index_dir)
    (index_dir / "vectors.npy").rename(tmp_path / "v.npy")
    (index_dir / "vectors.npy").symlink_to(tmp_path / "v.npy")  # same bytes, but outside the directory
    with pytest.raises(IndexLoadError, match="symbolic link"):
        SearchIndex.load(index_dir)


# ---- atomic directory swaps killed half-way (issue 11, item 11) ----------------------------------

def _contents(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def _siblings(d: Path) -> list[str]:
    return sorted(p.name for p in d.parent.iterdir())


_KILLED_SAVE = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from clipkit import fileio

    target, mode = Path(sys.argv[1]), sys.argv[2]
    if mode == "two-renames":  # a system without renameat2: kill between moving the old copy aside and renaming in
        fileio._exchange = lambda a, b: False
        def killing(real):
            def rename(src, dst):
                real(src, dst)
                if ".old-" in str(dst):
                    os.kill(os.getpid(), signal.SIGKILL)
            return rename
        os.rename, os.replace = killing(os.rename), killing(os.replace)
    else:  # kill right after the one-step exchange, before the old copy (now under the temp name) is deleted
        real = fileio._exchange
        def exchange(a, b):
            assert real(a, b), "renameat2(RENAME_EXCHANGE) unavailable here"
            os.kill(os.getpid(), signal.SIGKILL)
        fileio._exchange = exchange
    with fileio.atomic_dir(target) as tmp:
        (tmp / "w.bin").write_bytes(b"new")
""")


def _skip_without_exchange(tmp_path: Path) -> None:
    from clipkit import fileio

    a, b = tmp_path / "xa", tmp_path / "xb"
    a.mkdir(), b.mkdir()
    if not fileio._exchange(a, b):
        pytest.skip("renameat2(RENAME_EXCHANGE) unavailable here: the two-rename fallback is used")
    a.rmdir(), b.rmdir()


@pytest.mark.parametrize("mode", ["two-renames", "exchange"])
def test_save_killed_during_the_swap_recovers(tmp_path, mode):
    if mode == "exchange":
        _skip_without_exchange(tmp_path)
    target = tmp_path / "model"
    with atomic_dir(target) as d:
        (d / "w.bin").write_bytes(b"old")
    out = run_script(_KILLED_SAVE, target, mode)
    assert out.returncode == -signal.SIGKILL, out.stderr
    if mode == "two-renames":
        assert not target.exists() and any(".model.old-" in n for n in _siblings(target))  # the gap, frozen
        recover_dir(target)  # what every load does first
        assert _contents(target) == {"w.bin": b"old"}
    else:
        assert _contents(target) == {"w.bin": b"new"}  # no instant without `model`
    with atomic_dir(target) as d:  # and the next save works and leaves nothing behind but temp leftovers
        (d / "w.bin").write_bytes(b"newer")
    assert _contents(target) == {"w.bin": b"newer"}
    assert not [n for n in _siblings(target) if ".old-" in n]


def test_leftover_old_copy_of_a_pid_1_container_does_not_block_saves(tmp_path):
    """Before: the old copy was moved to `.NAME.old-<pid>`; a kill left it, and in a container (PID 1 every run)
    the next save failed with "Directory not empty" forever."""
    target = tmp_path / "model"
    with atomic_dir(target) as d:
        (d / "w.bin").write_bytes(b"v1")
    stale = tmp_path / f".model.old-{os.getpid()}"  # what a killed save of this process id left
    shutil.copytree(target, stale)
    with atomic_dir(target) as d:
        (d / "w.bin").write_bytes(b"v2")
    assert _contents(target) == {"w.bin": b"v2"} and not stale.exists()
    shutil.copytree(target, stale)  # killed between the renames: only the old copy is left
    shutil.rmtree(target)
    recover_dir(target)
    assert _contents(target) == {"w.bin": b"v2"} and not stale.exists()


_POLL = textwrap.dedent("""
    import os, sys, time
    target, deadline, missing, seen = sys.argv[1], time.time() + float(sys.argv[2]), 0, 0
    open(sys.argv[3], "w").close()
    while time.time() < deadline:
        if os.path.isdir(target):
            seen += 1
        else:
            missing += 1
    print(missing, seen)
""")


def test_directory_never_missing_while_saves_swap_it(tmp_path):
    """Before: between the two renames NAME did not exist; a reader polling in another process saw it missing."""
    _skip_without_exchange(tmp_path)
    target, ready = tmp_path / "model", tmp_path / "ready"
    with atomic_dir(target) as d:
        (d / "w.bin").write_bytes(b"0")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    poller = subprocess.Popen([sys.executable, "-c", _POLL, str(target), "6", str(ready)], stdout=subprocess.PIPE,
                              text=True, env=env)
    while not ready.exists():
        assert poller.poll() is None, "the polling process died"
    for i in range(300):
        with atomic_dir(target) as d:
            (d / "w.bin").write_bytes(str(i).encode())
    missing, seen = map(int, poller.communicate(timeout=60)[0].split())
    assert seen > 0 and missing == 0, f"{target} was missing in {missing} of {missing + seen} polls"


def test_swap_fsyncs_the_new_directory_before_renaming(tmp_path, monkeypatch):
    from clipkit import fileio

    synced, swapped = [], []
    real_fsync_dir, real_swap = fileio.fsync_dir, fileio._swap_in
    monkeypatch.setattr(fileio, "fsync_dir", lambda p: (synced.append(Path(p)), real_fsync_dir(p)))
    monkeypatch.setattr(fileio, "_swap_in", lambda tmp, path: (swapped.append(list(synced)), real_swap(tmp, path)))
    with atomic_dir(tmp_path / "model") as d:
        (d / "sub").mkdir()
        (d / "sub" / "f").write_bytes(b"x")
        tmp = d
    assert tmp in swapped[0] and tmp / "sub" in swapped[0]  # its entries are durable before it is renamed in
    assert synced[-1] == tmp_path  # and the rename itself after


# ---- space for memory-mapped writes (issue 11, item 12) ------------------------------------------

def test_reserve_space_fails_with_enospc_naming_path_and_bytes(tmp_path, monkeypatch):
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(OSError, match=r"pixels\.u8: not enough disk space: needs 123456789 bytes") as e:
        reserve_space(tmp_path / "pixels.u8", 123456789)
    assert e.value.errno == errno.ENOSPC and "\n" not in str(e.value)


def test_reserve_space_allocates_real_blocks(tmp_path):
    reserve_space(tmp_path / "f", 1 << 20)
    st = (tmp_path / "f").stat()
    assert st.st_size == 1 << 20 and st.st_blocks * 512 >= 1 << 20  # not sparse
