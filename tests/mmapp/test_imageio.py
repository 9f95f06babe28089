"""Tests for mmapp.imageio: every bad-upload corpus file decodes correctly or fails clearly."""
from __future__ import annotations

import hashlib
import io
import struct
import time
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from mmapp.imageio import (
    DecodedImage,
    ImageDecodeError,
    ImageLimits,
    describe_content,
    load_image,
    sha256_bytes,
)
from tests.bad_uploads import (
    BLUE,
    GREEN,
    RED,
    BadUpload,
    black_bilevel_png,
    make_bad_upload_corpus,
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, BadUpload]:
    return {u.name: u for u in make_bad_upload_corpus(tmp_path_factory.mktemp("bad_uploads"))}


def _encode(im: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **params)
    return buf.getvalue()


def _close(actual, expected, tol=8) -> bool:
    return all(abs(a - e) <= tol for a, e in zip(actual, expected))


# --- the corpus --------------------------------------------------------------------------------

CORPUS_NAMES = [
    "empty.png", "truncated.jpg", "not_an_image.png", "html_as_jpg.jpg", "bomb.png",
    "over_limit_48mp.png", "huge_bytes.png", "svg_with_script.svg", "document.pdf", "icon.ico",
    "one_by_one.png", "wide_8000x8.png", "gray16.png", "cmyk.jpg", "palette.png", "rgba.png",
    "gray_alpha.png", "bilevel.png", "float.tif", "animated.gif", "exif_rotated.jpg",
    "photo.webp", "png_named.jpg",
]


def test_corpus_lists_every_case(corpus):
    assert sorted(corpus) == sorted(CORPUS_NAMES)
    assert all(u.path.exists() for u in corpus.values())


@pytest.mark.parametrize("name", CORPUS_NAMES)
def test_corpus_file_decodes_or_fails_naming_the_file(corpus, name):
    upload = corpus[name]
    if upload.expect == "error":
        with pytest.raises(ImageDecodeError) as info:
            load_image(upload.path)
        assert name in str(info.value)
        with pytest.raises(ImageDecodeError, match="my-display-name"):
            load_image(upload.path, name="my-display-name")
        return
    decoded = load_image(upload.path, name=name)
    assert isinstance(decoded, DecodedImage)
    assert decoded.image.mode == "RGB"
    assert decoded.image.size == upload.expect_size
    assert type(decoded.image) is Image.Image  # a plain in-memory image, not a lazy ImageFile
    assert decoded.data == upload.path.read_bytes()
    assert decoded.sha256 == hashlib.sha256(decoded.data).hexdigest()


def test_corpus_generation_is_fast_and_deterministic(tmp_path):
    start = time.perf_counter()
    first = make_bad_upload_corpus(tmp_path / "a")
    elapsed = time.perf_counter() - start
    second = make_bad_upload_corpus(tmp_path / "b")
    assert elapsed < 2.0
    for a, b in zip(first, second):
        assert a.path.read_bytes() == b.path.read_bytes(), a.name


def test_bomb_is_a_real_png_that_is_small_on_disk(corpus):
    data = corpus["bomb.png"].path.read_bytes()
    assert len(data) < 200_000
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (30000, 30000)
    # The IDAT stream inflates to exactly the declared rows (filter byte + 3750 bytes each).
    idat = data[8 + 25 + 8 : -12 - 4]
    inflater, produced = zlib.decompressobj(), 0
    for start in range(0, len(idat), 1 << 16):
        produced += len(inflater.decompress(idat[start : start + (1 << 16)]))
    assert inflater.eof and produced == 30000 * (1 + 30000 // 8)


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("empty.png", "0 bytes"),
        ("truncated.jpg", "truncated"),
        ("not_an_image.png", "text is not an accepted image format"),
        ("html_as_jpg.jpg", "HTML is not an accepted image format"),
        ("svg_with_script.svg", "SVG is not an accepted image format"),
        ("document.pdf", "PDF is not an accepted image format"),
        ("icon.ico", "ICO is not an accepted image format"),
        ("bomb.png", "900.0 MP exceeds the 40.0 MP limit"),
        ("over_limit_48mp.png", "8000x6000 = 48.0 MP exceeds the 40.0 MP limit"),
        ("huge_bytes.png", "20,971,521 bytes"),
    ],
)
def test_error_messages_carry_the_offending_value(corpus, name, fragment):
    with pytest.raises(ImageDecodeError) as info:
        load_image(corpus[name].path, name=name)
    assert fragment in str(info.value)
    assert isinstance(info.value, ValueError)


def test_gray16_gradient_is_scaled_not_clipped(corpus):
    gray = np.asarray(load_image(corpus["gray16.png"].path).image)  # (H, W, 3)
    row = gray[0, :, 0]
    assert row[0] == 0 and row[-1] == 255
    assert 120 <= row[128] <= 135  # mid-gray in the middle, not white
    assert np.all(np.diff(row.astype(int)) >= 0)
    assert np.all(gray[..., 0] == gray[..., 1])
    assert (gray == 255).mean() < 0.05


def test_cmyk_jpeg_keeps_its_colour(corpus):
    image = load_image(corpus["cmyk.jpg"].path).image
    assert _close(image.getpixel((24, 16)), RED)


def test_palette_transparency_becomes_white(corpus):
    image = load_image(corpus["palette.png"].path).image
    assert image.getpixel((5, 10)) == (255, 255, 255)
    assert image.getpixel((35, 10)) == BLUE


def test_rgba_transparent_black_becomes_white(corpus):
    decoded = load_image(corpus["rgba.png"].path)
    assert decoded.original_mode == "RGBA"
    assert decoded.image.getpixel((5, 10)) == (255, 255, 255)
    assert decoded.image.getpixel((35, 10)) == GREEN


def test_gray_alpha_composited_on_white(corpus):
    image = load_image(corpus["gray_alpha.png"].path).image
    assert image.getpixel((2, 2)) == (255, 255, 255)
    assert image.getpixel((15, 2)) == (0, 0, 0)


def test_bilevel_and_float_modes(corpus):
    bilevel = load_image(corpus["bilevel.png"].path).image
    assert bilevel.getpixel((0, 0)) == (0, 0, 0) and bilevel.getpixel((15, 0)) == (255, 255, 255)
    floats = np.asarray(load_image(corpus["float.tif"].path).image)[0, :, 0]
    assert floats[0] == 0 and floats[-1] == 255 and 100 < floats[32] < 160


def test_animated_gif_gives_first_frame(corpus):
    decoded = load_image(corpus["animated.gif"].path)
    assert decoded.n_frames == 3
    assert decoded.image.getpixel((16, 12)) == RED
    with Image.open(corpus["animated.gif"].path) as im:
        assert im.n_frames == decoded.n_frames  # our block walker agrees with Pillow


def test_exif_orientation_applied(corpus):
    decoded = load_image(corpus["exif_rotated.jpg"].path)
    assert decoded.original_size == (60, 40)
    assert decoded.image.size == (40, 60)
    # Stored top (red) ends up on the right after a 90-degree clockwise turn.
    assert _close(decoded.image.getpixel((35, 30)), RED)
    assert _close(decoded.image.getpixel((5, 30)), BLUE)


def test_webp_photo(corpus):
    decoded = load_image(corpus["photo.webp"].path)
    assert decoded.format == "WEBP"
    r, g, b = decoded.image.getpixel((60, 2))
    assert r > 200 and g < 40


def test_format_comes_from_content_not_extension(corpus):
    assert load_image(corpus["png_named.jpg"].path).format == "PNG"


def test_extreme_but_legal_shapes(corpus):
    assert load_image(corpus["one_by_one.png"].path).image.getpixel((0, 0)) == RED
    wide = load_image(corpus["wide_8000x8.png"].path)
    assert wide.image.size == (8000, 8)


# --- limits ------------------------------------------------------------------------------------


def test_aspect_ratio_limit():
    data = _encode(Image.new("RGB", (8000, 7)), "PNG")  # 1143:1
    with pytest.raises(ImageDecodeError, match="aspect ratio 1143:1"):
        load_image(data, name="strip.png")
    assert load_image(data, limits=ImageLimits(max_aspect=2000)).image.size == (8000, 7)


def test_min_side_limit():
    data = _encode(Image.new("RGB", (1, 1)), "PNG")
    with pytest.raises(ImageDecodeError, match="1x1 has a side below the minimum of 2 px"):
        load_image(data, limits=ImageLimits(min_side=2), name="dot.png")


def test_max_bytes_on_bytes_and_path(tmp_path):
    data = _encode(Image.new("RGB", (8, 8)), "PNG")
    limits = ImageLimits(max_bytes=len(data) - 1)
    path = tmp_path / "small.png"
    path.write_bytes(data)
    for source in (data, path):
        with pytest.raises(ImageDecodeError, match=f"{len(data)} bytes"):
            load_image(source, limits=limits, name="small.png")


def test_format_allow_list_is_configurable():
    data = _encode(Image.new("RGB", (8, 8)), "JPEG")
    with pytest.raises(ImageDecodeError, match=r"JPEG is not an accepted .*\(accepted: PNG\)"):
        load_image(data, limits=ImageLimits(formats=("PNG",)), name="x.jpg")
    assert load_image(data, limits=ImageLimits(formats=["jpeg"])).format == "JPEG"


def test_pillow_bomb_guard_still_applies_when_our_limit_is_raised(corpus):
    with pytest.raises(ImageDecodeError, match="decompression-bomb limit"):
        load_image(corpus["bomb.png"].path, limits=ImageLimits(max_pixels=10**10))


def test_bomb_warning_turned_into_error_is_converted():
    # 10000x10000 = 100 MP: between Pillow's warning (89 MP) and error (179 MP) thresholds.
    data = black_bilevel_png(10000, 10000, rows_per_chunk=1000)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with pytest.raises(ImageDecodeError, match="100.0 MP exceeds the 40.0 MP limit"):
            load_image(data, name="warn.png")


@pytest.mark.parametrize(
    "kwargs",
    [{"max_bytes": 0}, {"max_pixels": -1}, {"min_side": 0}, {"max_aspect": 0.5}, {"formats": ()},
     {"formats": "PNG"}],
)
def test_limits_validate_their_values(kwargs):
    with pytest.raises(ValueError, match=repr(next(iter(kwargs.values())))):
        ImageLimits(**kwargs)


def test_unknown_format_name_in_limits():
    with pytest.raises(ValueError, match="JPG"):
        load_image(b"x", limits=ImageLimits(formats=("JPG",)))


# --- inputs and outputs ------------------------------------------------------------------------


def test_bytes_and_path_give_the_same_result(corpus):
    path = corpus["photo.webp"].path
    data = path.read_bytes()
    from_path = load_image(path)
    from_str = load_image(str(path))
    for source in (data, bytearray(data), memoryview(data)):
        from_bytes = load_image(source)
        assert from_bytes.sha256 == from_path.sha256 == from_str.sha256 == sha256_bytes(data)
        assert from_bytes.data == data and isinstance(from_bytes.data, bytes)
        assert from_bytes.image.tobytes() == from_path.image.tobytes()


def test_image_outlives_the_file(tmp_path):
    path = tmp_path / "gone.png"
    path.write_bytes(_encode(Image.new("RGB", (4, 4), GREEN), "PNG"))
    decoded = load_image(path)
    path.unlink()
    assert decoded.image.getpixel((3, 3)) == GREEN


def test_missing_file_and_wrong_type(tmp_path):
    missing = tmp_path / "missing.png"
    with pytest.raises(ImageDecodeError, match="missing.png"):
        load_image(missing)
    with pytest.raises(ImageDecodeError, match="cannot read"):
        load_image(tmp_path)  # a directory
    with pytest.raises(TypeError, match="BytesIO"):
        load_image(io.BytesIO(b"x"))  # type: ignore[arg-type]


def test_bytes_without_name_still_explain():
    with pytest.raises(ImageDecodeError, match="^upload: file is empty"):
        load_image(b"")


def test_pillow_global_settings_are_untouched(corpus):
    max_pixels, truncated = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
    for upload in corpus.values():
        try:
            load_image(upload.path)
        except ImageDecodeError:
            pass
    assert Image.MAX_IMAGE_PIXELS == max_pixels == 89478485
    assert ImageFile.LOAD_TRUNCATED_IMAGES is truncated is False


# --- modes and formats not in the corpus ---------------------------------------------------------

RAMP16 = np.tile(np.linspace(0, 65535, 64).round().astype(np.uint16), (4, 1))  # (4, 64)


@pytest.mark.parametrize(
    ("array", "fmt"),
    [
        (RAMP16, "TIFF"),  # I;16
        (RAMP16.astype(">u2"), "TIFF"),  # I;16B
        (RAMP16.astype(np.int32), "TIFF"),  # I, 16-bit range
    ],
)
def test_high_depth_gray_ramps(array, fmt):
    decoded = load_image(_encode(Image.fromarray(array), fmt), name="ramp.tif")
    row = np.asarray(decoded.image)[0, :, 0]
    assert row[0] == 0 and row[-1] == 255 and 110 < row[32] < 145
    assert decoded.original_mode in ("I;16", "I;16B", "I")


def test_32bit_int_outside_16bit_range_is_stretched():
    values = np.tile(np.linspace(-100_000, 100_000, 64).astype(np.int32), (4, 1))
    row = np.asarray(load_image(_encode(Image.fromarray(values), "TIFF")).image)[0, :, 0]
    assert row[0] == 0 and row[-1] == 255


def test_float_outside_unit_range_and_nan():
    values = np.tile(np.linspace(-5.0, 5.0, 64, dtype=np.float32), (4, 1))
    values[0, 0] = np.nan
    row = np.asarray(load_image(_encode(Image.fromarray(values), "TIFF")).image)[1, :, 0]
    assert row[0] == 0 and row[-1] == 255


def test_cmyk_tiff():
    image = load_image(_encode(Image.new("CMYK", (8, 8), (255, 0, 255, 0)), "TIFF")).image
    assert _close(image.getpixel((4, 4)), GREEN)


def test_animated_webp_and_png_give_first_frame():
    frames = [Image.new("RGB", (16, 16), c) for c in (RED, GREEN, BLUE)]
    for fmt in ("WEBP", "PNG"):
        data = _encode(frames[0], fmt, save_all=True, append_images=frames[1:], lossless=True)
        decoded = load_image(data, name=f"anim.{fmt.lower()}")
        assert decoded.n_frames == 3, fmt
        assert _close(decoded.image.getpixel((8, 8)), RED), fmt


def test_gif_with_local_palettes_and_extensions_counts_frames():
    frames = [Image.new("P", (20, 10), i) for i in range(5)]
    for i, frame in enumerate(frames):
        frame.putpalette([(i * 50) % 256, 0, 0] * 256)
    data = _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=[50] * 5,
                   comment=b"hello", loop=0, disposal=2)
    with Image.open(io.BytesIO(data)) as im:
        expected = im.n_frames
    assert load_image(data).n_frames == expected == 5


def test_truncated_png_names_the_file():
    rng = np.random.default_rng(1)
    data = _encode(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)), "PNG")
    with pytest.raises(ImageDecodeError, match="cut.png.*truncated or corrupt"):
        load_image(data[: len(data) // 2], name="cut.png")
    with pytest.raises(ImageDecodeError, match="cut.png': cannot read PNG data, .* truncated"):
        load_image(data[:20], name="cut.png")  # inside the IHDR chunk


@pytest.mark.parametrize(
    "head", [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a", b"BM\x00\x00"]
)
def test_signature_without_header(head):
    expected = r"'stub': looks like \w+ but its header is truncated"
    with pytest.raises(ImageDecodeError, match=expected):
        load_image(head, name="stub")


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data:UserWarning")
def test_malformed_exif_does_not_reject_the_photo():
    data = _encode(Image.new("RGB", (12, 8), RED), "JPEG", exif=b"Exif\x00\x00MM\x00*garbage")
    assert load_image(data, name="bad_exif.jpg").image.size == (12, 8)


def test_lab_tiff_converts_through_colour_management():
    data = _encode(Image.new("LAB", (4, 4), (128, 128, 128)), "TIFF")  # L=50%, a=b=0: gray
    r, g, b = load_image(data, name="lab.tif").image.getpixel((2, 2))
    assert 100 < r < 140 and abs(r - g) < 6 and abs(g - b) < 6


@pytest.mark.parametrize(
    ("head", "label"),
    [
        (b"\x89PNG\r\n\x1a\n", "PNG"),
        (b"\xef\xbb\xbf<svg xmlns='http://www.w3.org/2000/svg'/>", "SVG"),
        (b"<?xml version='1.0'?><svg/>", "SVG"),
        (b"  <HTML><body>", "HTML"),
        (b"BMW is a car brand\n", "text"),
        (b"\x00\x00\x00\x1cftypheic\x00\x00", "HEIC"),
        (b"\x00\x00\x00\x1cftypavif\x00\x00", "AVIF"),
        (b"RIFF\x00\x00\x00\x00WAVEfmt ", "RIFF (WAVE)"),
        (b"\x00\x01\x02\x03\x04\x05\x06\x07\x08", "unknown (starts with 00 01 02 03 04 05 06 07)"),
    ],
)
def test_describe_content(head, label):
    assert describe_content(head) == label
