"""Validate and normalize downloaded image bytes: sniff, bomb guard, size rules, RGB, resize, JPEG.

The bytes must decode as a raster image whatever the server's Content-Type claimed; HTML, SVG, empty and
truncated bodies are refused. Only common raster formats are opened (no EPS, which would run Ghostscript).
The pixel count from the header is checked before anything is decoded, then the image is fully decoded
(a truncated file fails, :data:`PIL.ImageFile.LOAD_TRUNCATED_IMAGES` must stay off), converted to RGB
(transparency composited on white), EXIF orientation applied, shrunk so the longer side is at most
``max_side`` and re-encoded as JPEG (or, with ``keep_fitting_jpeg``, a JPEG that already fits every rule is
kept as downloaded after a full decode). Pillow releases the GIL while decoding, resizing and encoding, so
threads scale.
"""

from __future__ import annotations

import hashlib
import io
from typing import NamedTuple

from PIL import ExifTags, Image, ImageFile, ImageOps, UnidentifiedImageError

ALLOWED_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")  # JPEG also opens MPO files


class ImageRefused(Exception):
    """Bytes that are not an acceptable image; ``code`` is the row status (``not_image``, ``bomb``, ...)."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason


class ProcessedImage(NamedTuple):
    """What :func:`process_image` returns (a tuple: ``jpeg, sha256, width, height, orig_width, orig_height``)."""

    jpeg: bytes
    sha256: str
    width: int
    height: int
    orig_width: int
    orig_height: int


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode == "RGB":
        return im
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "RGBa"):
        rgba = im.convert("RGBA")
        bg = Image.new("RGB", rgba.size, (255, 255, 255))
        bg.paste(rgba, mask=rgba.getchannel("A"))
        return bg
    if im.mode.startswith("I;16"):
        im = im.convert("I")
    if im.mode == "I":  # 16-bit greyscale: scale to 8 bit
        im = im.point(lambda v: v * (1 / 256)).convert("L")
    return im.convert("RGB")


def _exif_orientation(im: Image.Image) -> int:
    """The EXIF orientation tag (1 = as stored) of an opened image; 1 without EXIF."""
    if "exif" not in im.info:
        return 1
    try:
        return int(im.getexif().get(ExifTags.Base.Orientation, 1))
    except Exception:  # noqa: BLE001 - unreadable EXIF: re-encode (exif_transpose decides there)
        return 0


def process_image(data: bytes, *, min_side: int = 32, max_aspect: float = 5.0, max_side: int = 512,
                  max_pixels: int = 40_000_000, jpeg_quality: int = 90,
                  keep_fitting_jpeg: bool = False) -> ProcessedImage:
    """Check ``data`` and return it as an RGB JPEG no larger than ``max_side``.

    With ``keep_fitting_jpeg``, a JPEG that already is what this function would store is returned as downloaded,
    not re-encoded: baseline or progressive JPEG (not MPO), 3-channel (YCbCr/RGB), no EXIF rotation, longer side at
    most ``max_side``, no more bytes than its raw RGB pixels (so no large metadata or appended payload rides
    along), and every rule above met. It is still decoded in full (at 1/8 scale in the DCT domain: the whole
    entropy-coded stream is read, so a truncated or corrupt file is refused as before).

    Args:
        data: the downloaded body.
        min_side: smallest accepted shorter side of the original, in pixels.
        max_aspect: largest accepted ratio longer side / shorter side.
        max_side: longer side of the stored image at most, in pixels (never upscaled).
        max_pixels: largest accepted width*height of the original (decompression-bomb guard).
        jpeg_quality: JPEG quality of a re-encoded image (1-95).
        keep_fitting_jpeg: store a JPEG that already fits as downloaded (see above).

    Returns:
        ``(jpeg, sha256_of_jpeg, width, height, orig_width, orig_height)`` as a :class:`ProcessedImage`.

    Raises:
        ImageRefused: ``not_image``, ``bomb``, ``too_small``, ``aspect`` or ``decode_error``.
    """
    if not data:
        raise ImageRefused("not_image", "empty body")
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise ImageRefused("decode_error", "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is on; truncated files would pass")
    try:
        im = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageRefused("bomb", f"decompression bomb ({e})") from None
    except UnidentifiedImageError:
        head = data[:64].lstrip().lower()
        kind = ("HTML" if head.startswith((b"<!doctype html", b"<html")) else
                "SVG" if b"<svg" in data[:512].lower() or head.startswith(b"<?xml") else "unknown data")
        raise ImageRefused("not_image", f"not a raster image ({kind}, {len(data)} bytes)") from None
    except Exception as e:  # noqa: BLE001 - any parser failure on hostile bytes is a refusal
        raise ImageRefused("decode_error", f"cannot parse image header ({e.__class__.__name__}: {e})") from None
    with im:
        ow, oh = im.size
        if ow <= 0 or oh <= 0:
            raise ImageRefused("decode_error", f"invalid size {ow}x{oh}")
        if ow * oh > max_pixels:
            raise ImageRefused("bomb", f"{ow}x{oh} = {ow * oh} pixels exceeds max_pixels={max_pixels}")
        if min(ow, oh) < min_side:
            raise ImageRefused("too_small", f"{ow}x{oh} has a side under min_side={min_side}")
        if max(ow, oh) / min(ow, oh) > max_aspect:
            raise ImageRefused("aspect", f"{ow}x{oh} aspect ratio {max(ow, oh) / min(ow, oh):.2f} > {max_aspect:g}")
        if (keep_fitting_jpeg and im.format == "JPEG" and im.mode == "RGB" and max(ow, oh) <= max_side
                and len(data) <= 3 * ow * oh and _exif_orientation(im) == 1):
            try:
                im.draft("RGB", ((ow + 7) // 8, (oh + 7) // 8))
                im.load()
            except Exception as e:  # noqa: BLE001 - truncated / corrupt data raises OSError, SyntaxError, ...
                raise ImageRefused("decode_error", f"cannot decode image ({e.__class__.__name__}: {e})") from None
            return ProcessedImage(data, hashlib.sha256(data).hexdigest(), ow, oh, ow, oh)
        try:
            if im.format == "JPEG" and max(ow, oh) > 2 * max_side:
                scale = max_side / max(ow, oh)  # DCT-domain downscale: decodes much faster, still whole stream
                im.draft("RGB", (max(1, int(ow * scale)), max(1, int(oh * scale))))
            im.load()
            out = ImageOps.exif_transpose(im) or im
            out = _to_rgb(out)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageRefused("bomb", f"decompression bomb ({e})") from None
        except Exception as e:  # noqa: BLE001 - truncated / corrupt data raises OSError, SyntaxError, ValueError...
            raise ImageRefused("decode_error", f"cannot decode image ({e.__class__.__name__}: {e})") from None
    w, h = out.size
    if max(w, h) > max_side:
        scale = max_side / max(w, h)
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        out = out.resize((nw, nh), Image.Resampling.LANCZOS, reducing_gap=3.0)
    buf = io.BytesIO()
    out.save(buf, "JPEG", quality=jpeg_quality)
    jpeg = buf.getvalue()
    return ProcessedImage(jpeg, hashlib.sha256(jpeg).hexdigest(), out.size[0], out.size[1], ow, oh)
