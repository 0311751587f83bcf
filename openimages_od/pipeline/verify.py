"""Image verification: is this really a usable photo?

Rejections are data, not exceptions that stop a shard: each raises
:class:`Rejected` with a stable ``reason`` string that ends up in the ledger.

Reasons: ``empty``, ``not_image``, ``too_many_pixels`` (decompression bomb:
``image.max_pixels``), ``too_small``, ``placeholder`` (Flickr's "This photo is
no longer available" image), ``md5_mismatch`` (``OriginalMD5`` when the
original was fetched), ``truncated`` and ``corrupt`` (the full decode failed,
or, for a JPEG, the entropy-coded scan did not hold every pixel the header
declares: libjpeg only warns about that and fills the rest with grey, so
:func:`check_jpeg_scan` decodes it once more with warnings as errors).

Pillow's ``ImageFile.LOAD_TRUNCATED_IMAGES`` must stay off (it is asserted at
import): with it, truncated files decode to partly grey images silently.
"""

from __future__ import annotations

import base64
import hashlib
import io
import warnings

from PIL import Image, ImageFile

__all__ = [
    "PLACEHOLDER_MD5S",
    "PLACEHOLDER_SIZES",
    "Rejected",
    "check_jpeg_scan",
    "check_md5",
    "decode_jpeg_strict",
    "full_decode",
    "is_placeholder",
    "open_image",
]

# Hex MD5 digests of known placeholder files. Flickr serves its "photo
# unavailable" image for deleted photos (and redirects to a URL containing
# ``photo_unavailable``, caught in fetch.py). No digest could be verified
# offline, so the list starts empty: add digests seen in the wild here (the
# size heuristic below catches the known variants meanwhile).
PLACEHOLDER_MD5S: set[str] = set()
# Sizes of the placeholder variants (small PNG/GIF with a grey message).
PLACEHOLDER_SIZES: frozenset[tuple[int, int]] = frozenset(
    {(500, 374), (500, 375), (240, 179), (100, 75), (75, 75)}
)
# A real photo at those sizes is a JPEG of tens of KB; the placeholder is a few KB.
_PLACEHOLDER_MAX_BYTES = 32 * 1024

# Our own check below is the decompression-bomb limit; Pillow's global one would
# raise a different exception type (or warn) first.
Image.MAX_IMAGE_PIXELS = None
if ImageFile.LOAD_TRUNCATED_IMAGES:  # a process-wide switch some libraries flip
    raise ImportError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is on: truncated images would be accepted")


class Rejected(Exception):
    """The bytes are not a usable image.

    Attributes:
        reason: stable reason code (ledger ``error``).
        detail: human-readable detail.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def check_md5(data: bytes, original_md5: str | None) -> None:
    """Compare with Open Images' ``OriginalMD5`` (base64 of the binary digest).

    Raises:
        Rejected: ``md5_mismatch``.
    """
    if not original_md5:
        return
    got = base64.b64encode(hashlib.md5(data).digest()).decode()
    if got != original_md5.strip():
        raise Rejected("md5_mismatch", f"OriginalMD5 {original_md5} != {got}")


def is_placeholder(data: bytes, fmt: str | None, size: tuple[int, int]) -> bool:
    """Flickr's "photo unavailable" placeholder: known digest, or a small non-JPEG at a known size."""
    # Hashing every photo costs ~0.3 ms: only worth it once digests are listed.
    if PLACEHOLDER_MD5S and hashlib.md5(data).hexdigest() in PLACEHOLDER_MD5S:
        return True
    return fmt in ("PNG", "GIF") and tuple(size) in PLACEHOLDER_SIZES and len(data) <= _PLACEHOLDER_MAX_BYTES


def open_image(
    data: bytes, *, max_pixels: int, min_side: int = 1, reject_placeholder: bool = True
) -> Image.Image:
    """Parse the header (no pixel decode yet) and run the cheap checks.

    Args:
        data: the fetched bytes.
        max_pixels: width*height limit (decompression bombs are rejected before decoding).
        min_side: smallest acceptable side.
        reject_placeholder: check for Flickr's placeholder.

    Returns:
        A lazily-decoded Pillow image (call :func:`full_decode` or ``load`` next).

    Raises:
        Rejected: ``empty``, ``not_image``, ``too_many_pixels``, ``too_small``, ``placeholder``.
    """
    if not data:
        raise Rejected("empty", "zero bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise Rejected("too_many_pixels", str(exc)) from None
    except Exception as exc:
        raise Rejected("not_image", f"{type(exc).__name__}: {exc}"[:200]) from None
    w, h = img.size
    if w * h > max_pixels:
        raise Rejected("too_many_pixels", f"{w}x{h} > {max_pixels} pixels")
    if min(w, h) < min_side:
        raise Rejected("too_small", f"{w}x{h}, min side {min_side}")
    if reject_placeholder and is_placeholder(data, img.format, (w, h)):
        raise Rejected("placeholder", f"{img.format} {w}x{h}, {len(data)} bytes")
    return img


def check_jpeg_scan(data: bytes) -> None:
    """Entropy-decode a JPEG with libjpeg-turbo's warnings as errors.

    libjpeg (and so Pillow, OpenCV and TensorFlow) treats a scan that ends
    before the last MCU row (a truncated file, or a header that claims more
    rows than the data holds) as a warning and fills the rest with grey. Here
    every warning rejects the image. The output is grey at the smallest scale
    libjpeg offers, because only the entropy decode matters.

    Raises:
        Rejected: ``truncated`` (the scan ends early) or ``corrupt``.
    """
    import simplejpeg

    try:
        _, _, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        out = "CMYK" if str(colorspace).upper() in ("CMYK", "YCCK") else "GRAY"
        simplejpeg.decode_jpeg(data, colorspace=out, min_factor=8, strict=True)
    except Exception as exc:
        raise _jpeg_rejection(exc) from None


def _jpeg_rejection(exc: Exception) -> Rejected:
    msg = str(exc)
    low = msg.lower()
    reason = "truncated" if "premature end" in low or "truncated" in low else "corrupt"
    return Rejected(reason, f"JPEG scan: {msg}"[:200])


def decode_jpeg_strict(
    data: bytes, mode: str, size: tuple[int, int], draft: tuple[int, int] | None = None
) -> Image.Image:
    """Decode a YCbCr or greyscale JPEG with libjpeg-turbo, warnings as errors (one decode, not two).

    Args:
        data: the JPEG bytes.
        mode: ``RGB`` or ``L`` (Pillow's mode for the file).
        size: the file's ``(width, height)``.
        draft: ``(width, height)`` the result must at least have: decoded at the smallest
            of 1/1, 1/2, 1/4, 1/8 scale that allows it, exactly as Pillow's ``draft`` chooses
            (libjpeg-turbo could scale by any n/8, but that would change the pixels).

    Raises:
        Rejected: ``truncated`` or ``corrupt`` (see :func:`check_jpeg_scan`).
    """
    import simplejpeg

    w, h = size
    factor = 1
    if draft is not None:
        room = min(w // max(1, draft[0]), h // max(1, draft[1]))
        factor = next(f for f in (8, 4, 2, 1) if room >= f)
    # The smallest n/8 scale with at least ceil(side / factor) pixels is exactly 1/factor.
    w, h = -(-w // factor), -(-h // factor)
    try:
        arr = simplejpeg.decode_jpeg(
            data, colorspace="GRAY" if mode == "L" else "RGB", min_width=w, min_height=h, strict=True
        )
    except Exception as exc:
        raise _jpeg_rejection(exc) from None
    return Image.fromarray(arr[:, :, 0] if mode == "L" else arr, mode)


def full_decode(img: Image.Image, data: bytes | None = None) -> Image.Image:
    """Decode every pixel; truncated or corrupt data is rejected.

    Args:
        img: a lazily-decoded image from :func:`open_image`.
        data: its bytes; for a JPEG, :func:`check_jpeg_scan` runs on them too.

    Raises:
        Rejected: ``truncated`` or ``corrupt``.
    """
    if data is not None and img.format in ("JPEG", "MPO"):
        check_jpeg_scan(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img.load()
    except OSError as exc:
        msg = str(exc)
        reason = "truncated" if "truncated" in msg or "premature" in msg.lower() else "corrupt"
        raise Rejected(reason, msg[:200]) from None
    except Exception as exc:
        raise Rejected("corrupt", f"{type(exc).__name__}: {exc}"[:200]) from None
    return img
