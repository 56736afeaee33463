"""Image loading: whatever users drop in becomes RGB, or a clear message naming the file."""

from __future__ import annotations

import hashlib
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ttrv.images import (
    ImageError,
    collect_images,
    file_sha256,
    load_image,
    load_items,
    read_labels_csv,
)

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def save(im: Image.Image, path: Path, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, **kw)
    return path


def close(a, b, tol=12):
    return all(abs(x - y) <= tol for x, y in zip(a, b, strict=True))


def test_rgba_composited_on_white(tmp_path):
    """Transparent pixels must not turn black (a plain convert("RGB") drops alpha)."""
    im = Image.new("RGBA", (20, 10), (255, 0, 0, 0))  # fully transparent red
    im.paste((0, 0, 255, 255), (10, 0, 20, 10))  # opaque blue right half
    im.putpixel((0, 0), (255, 0, 0, 128))  # half-transparent red
    out = load_image(save(im, tmp_path / "rgba.png"))
    assert out.mode == "RGB" and out.size == (20, 10)
    assert out.getpixel((5, 5)) == WHITE
    assert out.getpixel((15, 5)) == BLUE
    assert close(out.getpixel((0, 0)), (255, 127, 127), tol=2)


def test_la_and_palette_transparency_on_white(tmp_path):
    la = Image.new("LA", (4, 4), (0, 0))
    assert load_image(save(la, tmp_path / "la.png")).getpixel((1, 1)) == WHITE
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.putpixel((0, 0), 0)
    path = save(pal, tmp_path / "pal_t.png", transparency=0)
    out = load_image(path)
    assert out.getpixel((0, 0)) == WHITE and out.getpixel((2, 2)) == RED


def test_palette_without_transparency(tmp_path):
    pal = Image.new("P", (4, 4), 2)
    pal.putpalette([0, 0, 0, 0, 0, 0, 0, 255, 0] + [0] * 759)
    out = load_image(save(pal, tmp_path / "pal.png"))
    assert out.mode == "RGB" and out.getpixel((1, 1)) == GREEN


def test_cmyk_jpeg(tmp_path):
    path = save(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), tmp_path / "cmyk.jpg")
    assert Image.open(path).mode == "CMYK"
    out = load_image(path)
    assert out.mode == "RGB" and close(out.getpixel((8, 8)), RED, tol=40)


def test_16bit_grayscale_scaled_not_clipped(tmp_path):
    """Pillow's convert("L") clips I;16 at 255, so mid-grey 16-bit images turn white."""
    arr = np.zeros((4, 8), dtype=np.uint16)
    arr[:, 2:4], arr[:, 4:6], arr[:, 6:] = 30000, 65535, 1000
    path = save(Image.fromarray(arr), tmp_path / "g16.png")
    assert Image.open(path).mode == "I;16"
    out = load_image(path)
    assert out.mode == "RGB"
    # 0 -> 0, 30000 / 257 = 116.7 -> 117, 65535 -> 255, 1000 / 257 = 3.9 -> 4
    assert [out.getpixel((x, 0)) for x in (0, 2, 4, 6)] == [(v, v, v) for v in (0, 117, 255, 4)]


def test_32bit_int_and_float_grayscale(tmp_path):
    arr = np.array([[0, 30000, 65535]], dtype=np.int32)
    out = load_image(save(Image.fromarray(arr), tmp_path / "i.tif"))
    assert [out.getpixel((x, 0))[0] for x in range(3)] == [0, 117, 255]
    farr = np.array([[0.0, 0.5, 1.0]], dtype=np.float32)
    out = load_image(save(Image.fromarray(farr), tmp_path / "f.tif"))
    assert [out.getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_animated_gif_first_frame(tmp_path):
    frames = [Image.new("RGB", (10, 10), c) for c in (RED, GREEN, BLUE)]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(path).n_frames == 3
    out = load_image(path)
    assert out.mode == "RGB" and out.getpixel((5, 5)) == RED


def test_huge_image_downscaled_keeping_aspect(tmp_path):
    path = save(Image.new("RGB", (5000, 300), GREEN), tmp_path / "wide.png")
    out = load_image(path)
    assert out.size == (1024, 61)  # 300 * 1024 / 5000 = 61.4
    assert out.getpixel((500, 30)) == GREEN
    assert load_image(path, max_side=None).size == (5000, 300)
    assert load_image(path, max_side=100).size == (100, 6)


def test_large_jpeg_decoded_at_reduced_scale(tmp_path):
    path = save(Image.new("RGB", (3000, 2000), BLUE), tmp_path / "big.jpg", quality=80)
    out = load_image(path, max_side=512)
    assert out.size == (512, 341)  # 2000 * 512 / 3000 = 341.3
    assert close(out.getpixel((100, 100)), BLUE, tol=12)


def test_exif_orientation_applied(tmp_path):
    im = Image.new("RGB", (40, 20), RED)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = save(im, tmp_path / "rot.jpg", exif=exif)
    assert load_image(path).size == (20, 40)


def test_decompression_bomb_refused_with_clear_message(tmp_path):
    path = save(Image.new("L", (200, 200)), tmp_path / "bomb.png")
    with pytest.raises(ImageError, match=r"bomb\.png.*200 x 200.*decompression bomb"):
        load_image(path, max_pixels=10_000)


def test_decompression_bomb_warning_becomes_our_message(tmp_path, monkeypatch):
    """Pillow warns on stderr while opening an image over its limit; the person must see
    only the product's message, which names the file."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow warns over it, fails at 2x
    path = save(Image.new("L", (40, 40)), tmp_path / "bomb.png")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ImageError, match=r"bomb\.png: 40 x 40 pixels is over the 1,000-pix"):
            load_image(path)
    assert [w.category.__name__ for w in caught] == []


@pytest.mark.parametrize(
    ("size", "ratio", "shrunk"),
    [((4000, 3), 1333, (1024, 1)), ((3, 4000), 1333, (1, 1024)), ((4000, 20), 205, (1024, 5))],
    ids=["wide", "tall", "rounded-over-when-shrunk"],
)
def test_strips_refused_with_clear_message(tmp_path, size, ratio, shrunk):
    """Qwen-VL's processors refuse over 200:1 with no file name; 4000 x 20 is 200:1 as
    given but 1024 x 5 (204.8:1) as the model would get it."""
    path = save(Image.new("RGB", size, RED), tmp_path / "strip.png")
    w, h = size
    with pytest.raises(
        ImageError, match=rf"strip\.png: {w} x {h} pixels is too elongated .* {ratio}:1, the limit"
    ):
        load_image(path)
    assert load_image(path, max_aspect=None).size == shrunk  # the limit can be lifted


def test_elongated_but_usable_images_load(tmp_path):
    path = save(Image.new("RGB", (2000, 11), RED), tmp_path / "banner.png")
    assert load_image(path).size == (1024, 6)  # 170.7:1, under the limit
    items, warnings_ = load_items([tmp_path])
    assert [it.name for it in items] == ["banner.png"] and warnings_ == []


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda p: p.write_bytes(b""), "empty file"),
        (lambda p: p.write_text("hello, not pixels"), "not an image file"),
        (lambda p: None, "file not found"),
        (lambda p: p.mkdir(), "is a folder"),
    ],
    ids=["empty", "text-as-png", "missing", "folder"],
)
def test_bad_files_raise_image_error_naming_the_file(tmp_path, make, reason):
    path = tmp_path / "bad.png"
    make(path)
    with pytest.raises(ImageError, match=reason) as info:
        load_image(path)
    assert "bad.png" in str(info.value)


@pytest.mark.parametrize("fmt", ["png", "jpg"])
def test_truncated_file_raises_image_error(tmp_path, fmt):
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    good = save(Image.fromarray(noise), tmp_path / f"good.{fmt}")
    cut = tmp_path / f"cut.{fmt}"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ImageError, match=r"cut\.\w+: corrupt or truncated"):
        load_image(cut)


def test_file_sha256(tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(b"abc" * 1000)
    assert file_sha256(path) == hashlib.sha256(b"abc" * 1000).hexdigest()


def make_tree(root: Path) -> None:
    save(Image.new("RGB", (8, 8), RED), root / "cat" / "b.png")
    save(Image.new("RGB", (8, 8), GREEN), root / "cat" / "sub" / "a.jpg")
    save(Image.new("RGB", (8, 8), BLUE), root / "dog" / "c.PNG")
    save(Image.new("RGB", (8, 8), WHITE), root / "top.png")
    (root / "notes.txt").write_text("not an image")
    save(Image.new("RGB", (8, 8)), root / ".hidden" / "h.png")
    (root / "._b.png").write_bytes(b"macOS resource fork")


def test_collect_images_expands_folders_sorted(tmp_path):
    make_tree(tmp_path / "data")
    missing = tmp_path / "nope.png"
    files, warnings = collect_images([tmp_path / "data", missing, tmp_path / "data" / "top.png"])
    rel = [f.relative_to(tmp_path / "data").as_posix() for f in files]
    assert rel == ["cat/b.png", "cat/sub/a.jpg", "dog/c.PNG", "top.png"]
    assert any("notes.txt" in w and "skipped 1 file" in w for w in warnings)
    assert any("nope.png: not found" in w for w in warnings)
    assert any("top.png: listed more than once" in w for w in warnings)
    assert len(warnings) == 3  # hidden files and folders are ignored silently


def test_collect_images_keeps_explicit_files_and_warns_on_empty_folders(tmp_path):
    odd = tmp_path / "scan.dat"
    odd.write_bytes(b"x")
    (tmp_path / "empty").mkdir()
    files, warnings = collect_images([odd, tmp_path / "empty"])
    assert files == [odd]
    assert warnings == [f"{tmp_path / 'empty'}: no image files in this folder"]


def test_load_items_skips_bad_files_and_duplicates(tmp_path):
    root = tmp_path / "imgs"
    good = save(Image.new("RGB", (8, 8), RED), root / "a.png")
    shutil.copy(good, root / "a_copy.png")
    save(Image.new("RGB", (8, 8), BLUE), root / "b.png")
    (root / "empty.png").write_bytes(b"")
    (root / "text.png").write_text("not an image")
    noise = np.random.default_rng(1).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    whole = save(Image.fromarray(noise), tmp_path / "whole.png").read_bytes()
    (root / "trunc.png").write_bytes(whole[: len(whole) // 2])

    items, warnings = load_items([root])
    assert [i.name for i in items] == ["a.png", "b.png"]
    assert items[0].image_id == file_sha256(good)
    assert items[0].image.mode == "RGB" and items[0].meta["path"] == str(good)
    assert all(i.label is None for i in items)
    joined = "\n".join(warnings)
    assert "a_copy.png: identical to" in joined and "a.png" in joined
    assert "empty.png: empty file" in joined
    assert "text.png: not an image file" in joined
    assert "trunc.png: corrupt or truncated" in joined
    assert len(warnings) == 4


def test_load_items_nothing_usable(tmp_path):
    (tmp_path / "x.png").write_text("nope")
    with pytest.raises(ImageError, match=r"no usable images.*x\.png: not an image file"):
        load_items([tmp_path / "x.png", tmp_path / "missing.jpg"])


def test_labels_from_folders(tmp_path):
    make_tree(tmp_path / "data")
    items, warnings = load_items([tmp_path / "data"], labels_from_folders=True)
    assert {i.name: i.label for i in items} == {
        "b.png": "cat",
        "a.jpg": "sub",  # the enclosing folder, whatever its depth
        "c.PNG": "dog",
        "top.png": None,
    }
    assert any("1 image(s) sit directly in a given folder" in w for w in warnings)


def test_labels_csv(tmp_path):
    make_tree(tmp_path / "data")
    csv_path = tmp_path / "data" / "labels.csv"
    csv_path.write_text(
        "\ufeffFile,Label,question,options\n"  # Excel's BOM and capitalised header
        "cat/b.png,kitten,What animal?,cat;dog;bird\n"
        "c.PNG,,Which one?,dog;wolf\n"
        "top.png,white,,only-one\n"
        "ghost.png,x,,\n",
        encoding="utf-8",
    )
    items, warnings = load_items([tmp_path / "data"], labels_from_folders=True, labels_csv=csv_path)
    by_name = {i.name: i for i in items}
    assert by_name["b.png"].label == "kitten"  # the CSV wins over the folder
    assert by_name["b.png"].question == "What animal?"
    assert by_name["b.png"].options == ["cat", "dog", "bird"]
    assert by_name["c.PNG"].label == "dog"  # empty CSV cell keeps the folder label
    assert by_name["c.PNG"].options == ["dog", "wolf"]
    assert by_name["top.png"].label == "white" and by_name["top.png"].options is None
    assert by_name["a.jpg"].question is None
    joined = "\n".join(warnings)
    assert "labels.csv line 4: fewer than 2 options" in joined
    assert "labels.csv: 1 row(s) match no image (ghost.png)" in joined


def test_read_labels_csv_errors(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("name,label\na.png,cat\n")
    with pytest.raises(ValueError, match="no 'file' column"):
        read_labels_csv(bad)
    with pytest.raises(ValueError, match="cannot read"):
        read_labels_csv(tmp_path / "missing.csv")
    dup = tmp_path / "dup.csv"
    dup.write_text("file,label\na.png,cat\n,dog\na.png,dog\n")
    rows, warnings = read_labels_csv(dup)
    assert rows["a.png"].label == "dog"
    assert any("line 3: no file name" in w for w in warnings)
    assert any("line 4: a.png listed again" in w for w in warnings)
