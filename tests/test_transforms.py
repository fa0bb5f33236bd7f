"""Image loading and preprocessing: every odd file kind from RELIABILITY.md section A (cases 1-8)."""
from __future__ import annotations

import io
import json
import multiprocessing
import pickle
import random
import resource
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, features
from torchvision import transforms as T

from clipkit.model.config import OPENAI_MEAN, OPENAI_STD, PreprocessConfig
from clipkit.errors import ImageLoadError
from clipkit.model.transforms import Preprocess, load_image

S = 32


def _photo(w: int = 96, h: int = 64, seed: int = 0) -> Image.Image:
    """A smooth, photo-like RGB image (gradients + blobs + mild noise) that JPEG keeps faithfully."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    rng = np.random.default_rng(seed)
    r = 255 * x / max(w - 1, 1)
    g = 255 * y / max(h - 1, 1)
    b = 127 + 100 * np.sin(x / 7.0) * np.cos(y / 5.0)
    a = np.stack([r, g, b], -1) + rng.normal(0, 3, (h, w, 3))
    return Image.fromarray(a.clip(0, 255).astype(np.uint8), "RGB")


def _reason(src, **kw) -> str:
    with pytest.raises(ImageLoadError) as ei:
        load_image(src, **kw)
    return ei.value.reason


def _tensor(src, mode: str = "shortest", size: int = S, **kw) -> torch.Tensor:
    out = Preprocess(PreprocessConfig(image_size=size, resize_mode=mode, **kw))(src)
    assert out.shape == (3, size, size) and out.dtype == torch.float32 and torch.isfinite(out).all()
    return out


def _png_1bit(path: Path, w: int, h: int) -> Path:
    """A valid all-black 1-bit PNG of any size, streamed so that writing it needs no big buffer."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    comp, row = zlib.compressobj(9), b"\x00" * (1 + (w + 7) // 8)
    idat = b"".join(comp.compress(row) for _ in range(h)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


# -- case 1-3: broken, non-image and missing files --------------------------------------------------


def test_truncated_jpeg_is_decode_error_naming_the_file(tmp_path):
    p = tmp_path / "trunc.jpg"
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (256, 256, 3), np.uint8)).save(buf, "JPEG")
    p.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageLoadError) as ei:
        load_image(p)
    assert ei.value.reason == "decode_error" and str(p) in str(ei.value) and ei.value.source == str(p)
    assert "<bytes>" in str(pytest.raises(ImageLoadError, load_image, p.read_bytes()).value)


@pytest.mark.parametrize("content", [b"", b"<html>404 not found</html>",
                                     b'<svg xmlns="http://www.w3.org/2000/svg" width="4" height="4"/>',
                                     b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 4 4\n"])
def test_non_images_are_unidentified(tmp_path, content):
    p = tmp_path / "fake.jpg"
    p.write_bytes(content)
    assert _reason(p) == "unidentified"  # EPS too: Pillow would shell out to Ghostscript


def test_missing_file(tmp_path):
    assert _reason(tmp_path / "nope.png") == "missing"
    assert _reason(tmp_path) == "missing"  # a directory is not an image file


def test_pixel_cap_is_checked_before_decode(tmp_path):
    p = tmp_path / "a.png"
    Image.new("RGB", (100, 100)).save(p)
    assert _reason(p, max_pixels=5_000) == "too_large"
    assert _reason(Image.new("RGB", (100, 100)), max_pixels=5_000) == "too_large"


def _load_bombs_in_child(paths: list[str], conn) -> None:
    with open("/proc/self/status") as f:  # a forked child's peak starts at its current RSS
        rss_kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))
    reasons = []
    for p in paths:
        try:
            load_image(p)
            reasons.append("loaded")
        except ImageLoadError as e:
            reasons.append(e.reason)
    conn.send((reasons, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_kb) / 1024))


def test_bombs_are_too_large_with_low_peak_memory(tmp_path):
    # 14000^2 trips Pillow's own bomb error (not an OSError); 9400^2 only clipkit's lower cap. Each would
    # need 88-196 MB as 1-byte pixels (3x that as RGB), so a growth of the peak under 40 MB proves no decode.
    paths = [str(_png_1bit(tmp_path / f"bomb{n}.png", n, n)) for n in (14000, 9400)]
    assert all(Path(p).stat().st_size < 40_000 for p in paths)
    parent, child = multiprocessing.get_context("fork").Pipe()
    proc = multiprocessing.get_context("fork").Process(target=_load_bombs_in_child, args=(paths, child))
    proc.start()
    assert parent.poll(60), "bomb loading hung"
    reasons, growth_mb = parent.recv()
    proc.join(10)
    assert reasons == ["too_large", "too_large"]
    assert growth_mb < 40, f"peak RSS grew by {growth_mb:.0f} MB while rejecting bombs"


# -- case 5: the mode zoo ---------------------------------------------------------------------------


def test_cmyk_jpeg(tmp_path):
    p = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (40, 30), (0, 255, 255, 0)).save(p)
    img = load_image(p)
    assert img.mode == "RGB" and np.abs(np.asarray(img, np.int16) - (255, 0, 0)).max() < 8
    _tensor(p)


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    g16 = np.tile(np.linspace(0, 65535, 128).astype(np.uint16), (64, 1))
    Image.fromarray(g16).save(tmp_path / "g16.png")
    Image.fromarray((g16 >> 8).astype(np.uint8)).save(tmp_path / "g8.png")
    with Image.open(tmp_path / "g16.png") as im:
        assert im.mode == "I;16"
    t16, t8 = _tensor(tmp_path / "g16.png"), _tensor(tmp_path / "g8.png")
    assert t16.std() >= 0.5 * t8.std()
    assert torch.allclose(t16, t8, atol=0.02)  # v / 257 maps 16-bit onto the same scale as its 8-bit twin
    big_endian = Image.frombytes("I;16B", (128, 64), g16.astype(">u2").tobytes())
    assert np.array_equal(np.asarray(load_image(big_endian)), np.asarray(load_image(tmp_path / "g16.png")))


def test_32bit_int_and_float_modes(tmp_path):
    ramp = np.linspace(0, 1, 64, dtype=np.float32)[None].repeat(16, 0)
    Image.fromarray((ramp * 1e6 - 5e5).astype(np.int32)).save(tmp_path / "i32.tif")  # outside 16 bit
    Image.fromarray(ramp * 40 - 3).save(tmp_path / "f_raw.tif")  # arbitrary range: min/max scaled
    Image.fromarray(ramp).save(tmp_path / "f_unit.tif")  # looks normalised: x 255
    for name in ("i32.tif", "f_raw.tif", "f_unit.tif"):
        a = np.asarray(load_image(tmp_path / name))[0, :, 0]
        assert a[0] == 0 and a[-1] == 255 and np.all(np.diff(a.astype(int)) >= 0), name
        _tensor(tmp_path / name)
    nan = ramp.copy()
    nan[0, 0] = np.nan
    _tensor(Image.fromarray(nan))


def test_alpha_hides_nothing(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[:, :4] = (255, 0, 0, 255)  # opaque red left
    rgba[:, 4:] = (0, 255, 0, 0)  # green hidden under alpha 0 on the right
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    for bg in [(255, 255, 255), (0, 0, 0)]:
        a = np.asarray(load_image(tmp_path / "rgba.png", background=bg))
        assert (a[:, :4] == (255, 0, 0)).all() and (a[:, 4:] == bg).all()
    half = Image.new("RGBA", (2, 2), (255, 0, 0, 128))
    assert np.abs(np.asarray(load_image(half))[0, 0].astype(int) - (255, 127, 127)).max() <= 1


def test_palette_la_pa_and_bilevel(tmp_path, recwarn):
    p = Image.new("P", (8, 8), 0)
    p.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 759)
    p.paste(1, (4, 0, 8, 8))
    p.save(tmp_path / "p_trns.png", transparency=bytes([255, 0, 200]))  # tRNS as bytes: index 1 hidden
    with Image.open(tmp_path / "p_trns.png") as im:
        assert isinstance(im.info["transparency"], bytes)
    a = np.asarray(load_image(tmp_path / "p_trns.png", background=(10, 20, 30)))
    assert (a[:, :4] == (255, 0, 0)).all() and (a[:, 4:] == (10, 20, 30)).all()
    Image.new("LA", (8, 6), (90, 0)).save(tmp_path / "la.png")
    assert (np.asarray(load_image(tmp_path / "la.png")) == 255).all()
    Image.new("1", (9, 7), 1).save(tmp_path / "one.png")
    assert (np.asarray(load_image(tmp_path / "one.png")) == 255).all()
    for name in ("p_trns.png", "la.png", "one.png"):
        _tensor(tmp_path / name)
    assert np.asarray(load_image(Image.new("PA", (3, 3), (0, 0)), background=(1, 2, 3)))[0, 0].tolist() == [1, 2, 3]
    assert not [w for w in recwarn.list if "PIL" in w.filename or "clipkit" in w.filename]


# -- case 6: orientation and broken metadata --------------------------------------------------------


def test_exif_orientation_matches_prerotated_twin(tmp_path):
    img = _photo(96, 64)
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    img.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    img.transpose(Image.Transpose.ROTATE_270).save(tmp_path / "twin.jpg", quality=95)
    loaded, twin = load_image(tmp_path / "rot.jpg"), load_image(tmp_path / "twin.jpg")
    assert loaded.size == (64, 96) == twin.size
    assert np.abs(np.asarray(loaded, np.float32) - np.asarray(twin, np.float32)).mean() < 3
    assert (_tensor(tmp_path / "rot.jpg") - _tensor(tmp_path / "twin.jpg")).abs().mean() < 0.05


def test_broken_exif_and_xmp_are_ignored(tmp_path):
    img = _photo(40, 30)
    img.save(tmp_path / "xmp.jpg", xmp=b'<x:xmpmeta tiff:Orientation="\xff\xfe\xc3\x28">\xff</x:xmpmeta>')
    img.save(tmp_path / "exif.jpg", exif=b"Exif\x00\x00II*\x00\xff\xff\xff\x7f\x01\x00")
    for name in ("xmp.jpg", "exif.jpg"):
        assert load_image(tmp_path / name).size == (40, 30)


# -- case 7: animation and extreme shapes -----------------------------------------------------------


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_animated_uses_first_frame(tmp_path, fmt):
    if fmt == "WEBP" and not features.check("webp"):
        pytest.skip("Pillow built without WebP")
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    p = tmp_path / f"anim.{fmt.lower()}"
    frames[0].save(p, fmt, save_all=True, append_images=frames[1:], duration=50, loop=0, lossless=True)
    with Image.open(p) as im:
        assert im.n_frames == 3
    assert np.abs(np.asarray(load_image(p), np.int16) - (255, 0, 0)).max() <= 2


@pytest.mark.parametrize("mode", ["shortest", "longest", "squash"])
@pytest.mark.parametrize("size", [(1, 1), (1, 10000), (10000, 1), (3, 2)])
@pytest.mark.parametrize("train", [False, True])
def test_tiny_and_extreme_shapes(mode, size, train):
    pre = Preprocess(PreprocessConfig(image_size=S, resize_mode=mode), train=train)
    out = pre(Image.new("RGB", size, (200, 30, 60)))
    assert out.shape == (3, S, S) and torch.isfinite(out).all()


# -- preprocessing geometry and parity --------------------------------------------------------------


def test_letterbox_pads_with_fill_and_keeps_aspect():
    img = Image.new("RGB", (64, 32), (255, 0, 0))
    pre = Preprocess(PreprocessConfig(image_size=S, resize_mode="longest", fill=(0, 0, 255)))
    a = np.asarray(pre.image(img))
    assert (a[:8] == (0, 0, 255)).all() and (a[24:] == (0, 0, 255)).all()
    assert (a[8:24] == (255, 0, 0)).all()  # 64x32 -> 32x16, centred: aspect kept
    t = pre(img)
    blue = (torch.tensor([0.0, 0.0, 1.0]) - torch.tensor(OPENAI_MEAN)) / torch.tensor(OPENAI_STD)
    assert torch.allclose(t[:, 0, 0], blue) and torch.allclose(t[:, -1, -1], blue)


def test_squash_ignores_aspect():
    img = Image.new("RGB", (64, 16), (0, 255, 0))
    img.paste((255, 0, 0), (0, 0, 32, 16))
    a = np.asarray(Preprocess(PreprocessConfig(image_size=S, resize_mode="squash")).image(img))
    assert a.shape == (S, S, 3) and (a[:, :14] == (255, 0, 0)).all() and (a[:, 18:] == (0, 255, 0)).all()


@pytest.mark.parametrize("size,interp", [((333, 250), "bicubic"), ((250, 401), "bicubic"), ((300, 300), "bilinear"),
                                         ((40, 900), "bicubic")])
def test_shortest_matches_torchvision_val_transform(size, interp):
    img = _photo(*size, seed=1)
    mode = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR}[interp]
    ref = T.Compose([T.Resize(224, interpolation=mode), T.CenterCrop(224), T.ToTensor(),
                     T.Normalize(OPENAI_MEAN, OPENAI_STD)])(img)
    diff = (_tensor(img, size=224, interpolation=interp) - ref).abs()
    if max(size) / min(size) <= 8:  # open_clip's val transform, bit for bit
        assert diff.max() < 1e-5
    else:  # extreme aspect resamples a source box: at most a level or two off, rarely
        assert diff.max() < 2.5 / 255 / min(OPENAI_STD) and diff.mean() < 0.01


def test_bytes_path_and_pil_inputs_agree(tmp_path):
    p = tmp_path / "x.png"
    _photo(50, 40).save(p)
    t = _tensor(p)
    with Image.open(p) as lazy:  # not yet decoded
        assert torch.equal(t, _tensor(p.read_bytes())) and torch.equal(t, _tensor(lazy))


@pytest.mark.parametrize("size,min_size", [((2000, 1200), 224), ((1800, 1792), 224), ((1793, 1799), 224),
                                           ((640, 480), 64), ((300, 200), 224)])
def test_jpeg_draft_never_below_min_size(tmp_path, size, min_size):
    p = tmp_path / "big.jpg"
    Image.new("RGB", size, (30, 140, 200)).save(p)
    img = load_image(p, min_size=min_size)
    assert min(img.size) >= min(min_size, *size)
    if min(size) >= 2 * min_size:
        assert img.size[0] < size[0]  # draft actually reduced the decode
    assert load_image(p).size == size  # without min_size: full resolution


def test_train_augmentation_random_but_never_flipped():
    img = Image.new("RGB", (80, 60), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 40, 60))  # red left half, blue right half
    pre = Preprocess(PreprocessConfig(image_size=S), train=True)
    torch.manual_seed(0)
    outs = [pre(img) for _ in range(8)]
    assert not all(torch.equal(outs[0], o) for o in outs[1:])
    for o in outs:  # channel 0 (red) stays on the left
        assert o[0, :, : S // 4].mean() > o[0, :, -S // 4:].mean()
    torch.manual_seed(0)
    assert torch.equal(pre(img), outs[0])  # torch RNG drives it: seeded workers reproduce


def test_batch_and_pickle(tmp_path):
    pre = Preprocess(PreprocessConfig(image_size=S, resize_mode="longest"))
    items = [_photo(40, 30), _photo(20, 50)]
    out = pre.batch(items)
    assert out.shape == (2, 3, S, S) and torch.equal(out[1], pre(items[1]))
    assert pre.batch([]).shape == (0, 3, S, S)
    assert torch.equal(pickle.loads(pickle.dumps(pre))(items[0]), out[0])
    with pytest.raises(ValueError):
        Preprocess(PreprocessConfig(interpolation="cubic"))


def test_uint8_then_batch_normalize_equals_per_item():
    """The Embedder decodes to uint8 in threads and normalises per batch: bit-identical to one item at a time."""
    pre = Preprocess(PreprocessConfig(image_size=S))
    items = [_photo(40, 30), _photo(20, 50), _photo(33, 33)]
    one = [pre.uint8(item) for item in items]
    assert all(x.dtype == torch.uint8 and x.shape == (3, S, S) for x in one)
    assert torch.equal(pre.normalize(torch.stack(one)), torch.stack([pre(item) for item in items]))


# -- case 8: mutation fuzz --------------------------------------------------------------------------

FUZZ_FORMATS = ["PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF", "ICO", "TGA", "PPM"]


def _mutants(n: int, seed: int = 0):
    """Seeded byte flips, truncations and 4-byte size-field overwrites over small valid files."""
    rng = random.Random(seed)
    for fmt in FUZZ_FORMATS:
        buf = io.BytesIO()
        _photo(24, 16, seed=2).save(buf, fmt)
        base = buf.getvalue()
        for _ in range(n):
            b = bytearray(base)
            kind = rng.randrange(3)
            if kind == 0:
                for _ in range(rng.randint(1, 8)):
                    b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
            elif kind == 1:
                b = b[: rng.randrange(len(b))]
            else:
                at = rng.randrange(max(1, len(b) - 4))
                b[at:at + 4] = struct.pack("<I", rng.choice([0, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, rng.getrandbits(32)]))
            yield fmt, bytes(b)


def _fuzz(n: int) -> dict[str, int]:
    counts: dict[str, int] = {}
    for _fmt, data in _mutants(n):
        try:
            load_image(data, max_pixels=4_000_000)
            key = "ok"
        except ImageLoadError as e:
            key = e.reason
        counts[key] = counts.get(key, 0) + 1
    return counts


def test_mutation_fuzz_small():
    counts = _fuzz(12)  # any exception other than ImageLoadError fails the test
    assert sum(counts.values()) == 12 * len(FUZZ_FORMATS) and set(counts) <= {"ok", "decode_error", "unidentified",
                                                                              "too_large"}


@pytest.mark.slow
def test_mutation_fuzz_full_in_subprocess():
    here = Path(__file__).resolve().parent
    code = f"import sys; sys.path.insert(0, {str(here)!r}); from test_transforms import _fuzz; print(_fuzz(200))"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=here.parent)
    assert res.returncode == 0, res.stderr[-2000:]  # catches segfaults (negative rc) and uncaught errors
    print(res.stdout)


def _open_clip_val(size: int = 224):
    import open_clip

    return open_clip.image_transform(size, is_train=False)


@pytest.mark.parametrize("fmt,size", [("PNG", (640, 480)), ("JPEG", (300, 250)), ("JPEG", (640, 480)),
                                      ("JPEG", (2000, 1500))])
def test_files_against_open_clips_val_transform(tmp_path, fmt, size):
    """On files: bit for bit except JPEGs >= 2x the target, which draft decoding makes close, not equal."""
    p = tmp_path / f"x.{fmt.lower()}"
    _photo(*size, seed=3).save(p, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    with Image.open(p) as img:
        ref = _open_clip_val()(img)
    draft = (Preprocess(PreprocessConfig(image_size=224))(p) - ref).abs()
    exact = (Preprocess(PreprocessConfig(image_size=224, jpeg_draft=False))(p) - ref).abs()
    assert exact.max() < 1e-5  # the full decode is open_clip's transform
    if fmt == "JPEG" and min(size) >= 2 * 224:
        assert 1e-3 < draft.mean() < 0.03  # reduced-scale DCT decode: measured 0.007-0.02 on photos
    else:
        assert draft.max() < 1e-5


# -- issue 11, item 10: decoding in threads leaves the process's warning filters alone -------------

_THREADED_DECODE = r"""
import json, sys, threading, warnings
from clipkit.model.transforms import load_image

before = list(warnings.filters)
changed, done = [], threading.Event()

def watch():
    while not done.is_set():
        if warnings.filters != before:
            changed.append(len(warnings.filters))

def decode():
    for _ in range(15):
        for p in sys.argv[1:]:
            load_image(p)

watcher = threading.Thread(target=watch)
watcher.start()
workers = [threading.Thread(target=decode) for _ in range(4)]
for t in workers:
    t.start()
for t in workers:
    t.join()
done.set()
watcher.join()
print(json.dumps({"changed_while_decoding": len(changed), "same_after": warnings.filters == before}))
warnings.warn("an unrelated warning after decoding", UserWarning)
"""


def test_threaded_decoding_never_touches_the_global_warning_filters(tmp_path):
    """Before: `warnings.catch_warnings()` in load_image swapped the process-global filter list on every call;
    with 4 threads an `ignore` filter was left at its front and later warnings were lost everywhere."""
    big = _photo(320, 240)
    big.save(tmp_path / "exif.jpg", exif=b"Exif\x00\x00II*\x00\xff\xff\xff\x7f\x01\x00")  # Pillow warns on it
    _photo(64, 48).save(tmp_path / "plain.png")
    env = {"PYTHONPATH": str(Path(__file__).resolve().parents[1]), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", _THREADED_DECODE, str(tmp_path / "exif.jpg"), str(tmp_path / "plain.png")],
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout)
    assert report == {"changed_while_decoding": 0, "same_after": True}
    assert "an unrelated warning after decoding" in out.stderr  # nothing left behind that hides warnings
    assert "Corrupt EXIF" not in out.stderr  # and Pillow's metadata warnings stay quiet, as before
