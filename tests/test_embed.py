"""Embedder: batched float32 unit-norm rows equal to the model's own encode_*, and failed images kept in place."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

import clipkit
from clipkit.errors import ImageLoadError
from clipkit.model.transforms import Preprocess

from helpers import random_image

TEXTS = ["a red apple", "two dogs in the snow", "a cat", "고양이 사진 🐱", "a long caption " * 30]


@pytest.fixture(scope="module")
def in_memory(tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    return model, Preprocess(model.config.preprocess), tok


def _reference_images(model, preprocess, items) -> np.ndarray:
    with torch.no_grad():
        return model.encode_image(torch.stack([preprocess(i) for i in items])).numpy()


def _check_rows(out: np.ndarray, n: int, dim: int) -> None:
    assert out.dtype == np.float32 and out.shape == (n, dim)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("source", ["path", "in-memory"])
def test_embedder_matches_model(source, in_memory, saved_tiny_dir, image_files) -> None:
    model, preprocess, tok = in_memory
    kw = dict(device="cpu", batch_size=3, progress=False, precision="fp32")  # the model's own fp32 outputs
    if source == "path":
        e = clipkit.Embedder(saved_tiny_dir, **kw)
    else:
        e = clipkit.Embedder(model, preprocess=preprocess, tokenizer=tok, **kw)
    assert e.dim == model.embed_dim
    items = [image_files[0], image_files[1].read_bytes(), random_image(7), str(image_files[3])]  # path, bytes, PIL, str
    imgs = e.images(items)
    _check_rows(imgs, 4, model.embed_dim)
    np.testing.assert_allclose(imgs, _reference_images(model, preprocess, items), atol=1e-5, rtol=0)
    assert e.failures == []

    txts = e.texts(TEXTS)
    _check_rows(txts, len(TEXTS), model.embed_dim)
    with torch.no_grad():
        ref = model.encode_text(tok(TEXTS)).numpy()
    np.testing.assert_allclose(txts, ref, atol=1e-5, rtol=0)
    assert e.texts([]).shape == (0, model.embed_dim)
    with pytest.raises(TypeError):
        e.texts("a single string")


def test_embedder_nan_row_for_corrupt_image(in_memory, image_files, tmp_path) -> None:
    model, preprocess, tok = in_memory
    bad = tmp_path / "corrupt.png"
    bad.write_bytes(image_files[0].read_bytes()[:60])  # a truncated PNG
    items = [image_files[0], image_files[1], bad, image_files[2], image_files[3]]
    e = clipkit.Embedder(model, preprocess=preprocess, tokenizer=tok, device="cpu", batch_size=2, progress=False)
    out = e.images(items, on_error="nan")
    assert out.shape == (5, model.embed_dim) and out.dtype == np.float32
    assert np.isnan(out[2]).all()
    good = [0, 1, 3, 4]
    assert np.isfinite(out[good]).all()
    for i in good:  # rows stay aligned: each equals the image embedded on its own
        np.testing.assert_allclose(out[i], e.images([items[i]])[0], atol=1e-5, rtol=0)
    e.images(items, on_error="nan")
    assert [i for i, _ in e.failures] == [2]
    err = e.failures[0][1]
    assert isinstance(err, ImageLoadError) and "corrupt.png" in str(err)

    with pytest.raises(ImageLoadError) as raised:
        e.images(items, on_error="raise")
    assert "corrupt.png" in str(raised.value)
    with pytest.raises(ValueError):
        e.images(items, on_error="skip")


def _with_uint8(preprocess: Preprocess, per_item) -> Preprocess:
    """A copy of `preprocess` whose per-item decode (what the Embedder's threads run) is `per_item`."""
    import copy

    out = copy.copy(preprocess)
    out.uint8 = per_item
    return out


def test_failures_are_per_thread(in_memory, image_files, tmp_path) -> None:
    """Two threads share one Embedder: a call in thread B in the middle of thread A's call must not
    replace or mix A's failure record (the old shared `self.failures` list was reset by every call)."""
    model, preprocess, tok = in_memory
    bad_a, bad_b = tmp_path / "bad_a.png", tmp_path / "bad_b.png"
    for bad in (bad_a, bad_b):
        bad.write_bytes(image_files[0].read_bytes()[:60])
    gate, paused, resume = str(image_files[1]), threading.Event(), threading.Event()

    def gated(item):  # A stops here, after its failure was recorded, until B is done
        if item == gate:
            paused.set()
            assert resume.wait(30)
        return preprocess.uint8(item)
    e = clipkit.Embedder(model, preprocess=preprocess, tokenizer=tok, device="cpu", batch_size=1, progress=False)
    e.preprocess = _with_uint8(preprocess, gated)
    seen = {}

    def thread_a() -> None:
        e.images([bad_a, gate], on_error="nan")
        seen["a"] = [(i, err.source) for i, err in e.failures]
    a = threading.Thread(target=thread_a)
    a.start()
    assert paused.wait(30)
    e.images([image_files[2], bad_b, image_files[3]], on_error="nan")
    seen["b"] = [(i, err.source) for i, err in e.failures]
    resume.set()
    a.join(30)
    assert seen == {"a": [(0, str(bad_a))], "b": [(1, str(bad_b))]}


def test_pool_keeps_order_and_nan_rows_with_failures(in_memory, image_files, tmp_path) -> None:
    """Decoding runs in worker threads, out of order (later items finish first here); rows and the failure
    record still follow item order, and every row equals the image embedded on its own."""
    import time

    model, preprocess, tok = in_memory
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    items = [image_files[i % 4] if i % 3 else bad for i in range(11)]  # failures at 0, 3, 6, 9
    threads = set()

    def slow_first(item):  # the first items of each batch take longest, so completion order differs
        threads.add(threading.current_thread().name)
        time.sleep(0.02 * (4 - items.index(item) % 4) if item != bad else 0.0)
        return preprocess.uint8(item)
    e = clipkit.Embedder(model, preprocess=preprocess, tokenizer=tok, device="cpu", batch_size=4, progress=False,
                         precision="fp32", workers=4)
    e.preprocess = _with_uint8(preprocess, slow_first)
    out = e.images(items, on_error="nan")
    assert any(name.startswith("clipkit-decode") for name in threads)  # decoded by the pool
    assert [i for i, _ in e.failures] == [0, 3, 6, 9]
    assert np.isnan(out[[0, 3, 6, 9]]).all()
    good = [i for i in range(11) if i % 3]
    np.testing.assert_allclose(out[good], _reference_images(model, preprocess, [items[i] for i in good]), atol=1e-5)
    serial = clipkit.Embedder(model, preprocess=preprocess, tokenizer=tok, device="cpu", batch_size=4,
                              progress=False, precision="fp32", workers=0)
    np.testing.assert_array_equal(serial.images(items, on_error="nan"), out)
    with pytest.raises(ImageLoadError):  # the first failure raises in the caller, pool or not
        e.images(items, on_error="raise")
