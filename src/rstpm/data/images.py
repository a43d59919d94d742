"""Reading one image or mask under the input policy: the decompression-bomb guard, cheap
file checks, any mode and bit depth to RGB in [0, 1], masks checked against their image.

All errors caused by the user's data raise :class:`DataError`, whose message is one line that
names the offending file and says what to do. The input policy shared by every verb (what is
skipped, what is an error, what just works) is written down in ``docs/input-policy.md``.

Images larger than :func:`max_image_pixels` (default :data:`MAX_IMAGE_PIXELS`, overridable with
the environment variable ``RSTPM_MAX_IMAGE_PIXELS``) are refused before they are decoded: a guard
against decompression bombs. rstpm sets PIL's own ``Image.MAX_IMAGE_PIXELS`` to the same limit
before each read.
"""

from __future__ import annotations

import io
import os
import re
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
"""File extensions treated as images (compared case-insensitively)."""

IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "TIFF")
"""The only PIL decoders rstpm lets read a file or an upload (others, e.g. EPS, can call external
programs)."""

MAX_IMAGE_PIXELS = 100_000_000
"""Default largest image (width x height) rstpm decodes; larger files are refused, unread."""

MAX_PIXELS_ENV = "RSTPM_MAX_IMAGE_PIXELS"
"""Environment variable that overrides :data:`MAX_IMAGE_PIXELS` (a positive whole number)."""

_LOSSY_EXTENSIONS = {".jpg", ".jpeg"}


class DataError(ValueError):
    """A problem with the user's data; the message is one line naming the file and the fix."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


class ImageTooLarge(DataError):
    """An image above :func:`max_image_pixels`, refused before decoding."""


def is_dangling(path: Path) -> bool:
    return path.is_symlink() and not path.exists()


def check_file(path: Path, what: str = "image") -> None:
    """Cheap checks of an image file without reading it: it exists, is not a broken symbolic
    link, not a folder and not empty.

    Raises:
        DataError: one line naming the file and what to do.
    """
    path = Path(path)
    if is_dangling(path):
        raise DataError(
            f"cannot read {what} {path}: it is a broken symbolic link (to {os.readlink(path)}); "
            "fix the link or remove it"
        )
    if not path.exists():
        raise DataError(f"cannot read {what} {path}: it does not exist; check the path")
    if path.is_dir():
        raise DataError(
            f"cannot read {what} {path}: it is a folder, not an image file; give a file"
        )
    try:
        empty = path.stat().st_size == 0
    except OSError as exc:
        raise DataError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc
    if empty:
        raise DataError(
            f"cannot read {what} {path}: the file is empty (0 bytes); re-export or remove it"
        )


def max_image_pixels() -> int:
    """The largest image (width x height) rstpm decodes: ``$RSTPM_MAX_IMAGE_PIXELS`` when set,
    else :data:`MAX_IMAGE_PIXELS`.

    Raises:
        DataError: the environment variable is not a positive whole number.
    """
    raw = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not raw:
        return MAX_IMAGE_PIXELS
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise DataError(
            f"environment variable {MAX_PIXELS_ENV}={raw!r} is not a positive whole number "
            f"(a number of pixels, default {MAX_IMAGE_PIXELS}); fix or unset it"
        )
    return value


def _bomb_error(path: Path, what: str, size: str, pixels: int | None, limit: int) -> DataError:
    example = pixels if pixels is not None else 4 * limit
    return ImageTooLarge(
        f"cannot read {what} {path}: {size}, more than rstpm's limit of {limit:,} pixels (a "
        "guard against decompression bombs); if the file is trusted, raise the limit with the "
        f"environment variable {MAX_PIXELS_ENV} (e.g. {MAX_PIXELS_ENV}={example}), or downscale "
        "the image"
    )


def _read_error(path: Path, exc: BaseException, what: str = "image") -> DataError:
    if isinstance(exc, UnidentifiedImageError):
        reason = f"not an image file rstpm decodes ({', '.join(IMAGE_FORMATS)})"
    else:
        reason = str(exc) or type(exc).__name__
    return DataError(f"cannot read {what} {path}: {reason}; re-export or remove the file")


def _open_guarded(path: Path, what: str, decode: bool) -> Image.Image:
    """Open an image after :func:`check_file`, refuse it above :func:`max_image_pixels` before
    decoding, and decode it fully when ``decode`` (first frame, detached from the file)."""
    check_file(path, what)
    return _guarded(path, path, what, decode)


def _guarded(source: Path | io.BytesIO, name: Path, what: str, decode: bool) -> Image.Image:
    limit = max_image_pixels()
    Image.MAX_IMAGE_PIXELS = limit  # PIL warns above it, raises above twice it
    try:
        with warnings.catch_warnings():
            # rstpm's own check below replaces PIL's warning with an error.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source, formats=IMAGE_FORMATS) as img:
                width, height = img.size
                pixels = width * height
                if pixels > limit:
                    size = f"it is {width}x{height} = {pixels:,} pixels"
                    raise _bomb_error(name, what, size, pixels, limit)
                if not decode:
                    return img
                img.load()
                return img.copy()
    except DataError:
        raise
    except Image.DecompressionBombError as exc:  # above twice the limit: refused by PIL itself
        found = re.search(r"\((\d+) pixels\)", str(exc))
        pixels = int(found.group(1)) if found else None
        size = f"it has {pixels:,} pixels" if pixels is not None else "it is too large"
        raise _bomb_error(name, what, size, pixels, limit) from exc
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        raise _read_error(name, exc, what) from exc


def decode_image_bytes(data: bytes, name: str = "upload") -> Image.Image:
    """An image held in memory (an upload), decoded exactly as :func:`open_image` decodes a
    file; ``name`` stands for the file in error messages.

    Raises:
        DataError: empty, not an image, truncated or damaged; :class:`ImageTooLarge` above
            :func:`max_image_pixels`.
    """
    if not data:
        raise DataError(f"cannot read image {name}: it is empty (0 bytes); send the image's bytes")
    return _guarded(io.BytesIO(data), Path(name), "image", decode=True)


def open_image(path: Path, what: str = "image") -> Image.Image:
    """Open and fully decode an image file (its first frame) as a PIL image, in its own mode.

    ``what`` ("image", "mask") names the file in error messages.

    Raises:
        DataError: the file is missing, a broken link, a folder, empty, not an image, truncated
            or damaged, or larger than :func:`max_image_pixels`.
    """
    return _open_guarded(Path(path), what, decode=True)


def _normalise_size(size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(size, int):
        height = width = size
    else:
        height, width = (int(v) for v in size)
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {size!r}")
    return height, width


def _high_bit_depth(img: Image.Image) -> np.ndarray | None:
    """A (H,W) float32 array in [0,1] for 16/32-bit integer or float images, else None."""
    if img.mode.startswith("I"):
        values = np.asarray(img).astype(np.float32)
        return np.clip(values / 65535.0, 0.0, 1.0)
    if img.mode == "F":
        values = np.nan_to_num(np.asarray(img, dtype=np.float32))
        peak = float(values.max()) if values.size else 0.0
        scale = 1.0 if peak <= 1.0 else 255.0 if peak <= 255.0 else 65535.0
        return np.clip(values / scale, 0.0, 1.0)
    return None


def load_image(path: Path, size: int | tuple[int, int] | None = None) -> torch.Tensor:
    """Load an image as an RGB float32 tensor of shape (3, H, W) with values in [0, 1].

    Grayscale, palette, RGBA/LA (alpha dropped), CMYK and other 8-bit modes are converted to
    RGB; 16-bit and 32-bit integer images are scaled by 1/65535. When ``size`` is given the image
    is resized with PIL's antialiased bilinear filter to ``size x size`` (an int) or to
    ``(height, width)`` (a tuple).

    Raises:
        DataError: the file is missing, empty, truncated or not an image.
    """
    path = Path(path)
    return pil_to_tensor(open_image(path), size, str(path))


def pil_to_tensor(
    img: Image.Image, size: int | tuple[int, int] | None = None, name: str = "image"
) -> torch.Tensor:
    """A PIL image as :func:`load_image` returns a file: RGB float32 (3, H, W) in [0, 1],
    resized when ``size`` is given. ``name`` is used in error messages."""
    target = _normalise_size(size) if size is not None else None

    gray = _high_bit_depth(img)
    if gray is not None:
        if target is not None and gray.shape != target:
            resized = Image.fromarray(gray).resize(
                (target[1], target[0]), Image.Resampling.BILINEAR
            )
            gray = np.array(resized, dtype=np.float32)
        plane = torch.from_numpy(np.ascontiguousarray(gray)).clamp_(0.0, 1.0)
        return plane.unsqueeze(0).expand(3, -1, -1).contiguous()

    if img.mode == "1":
        img = img.convert("L")
    if img.mode != "RGB":
        try:
            img = img.convert("RGB")
        except (ValueError, OSError) as exc:
            raise DataError(
                f"cannot read image {name}: unsupported colour mode {img.mode}; "
                "re-export it as RGB or grayscale"
            ) from exc
    if target is not None and (img.height, img.width) != target:
        img = img.resize((target[1], target[0]), Image.Resampling.BILINEAR)
    array = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0).contiguous()


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) of an image, read from its header without decoding the pixels (with the
    same checks as :func:`open_image` but a truncated file is not noticed)."""
    img = _open_guarded(Path(path), "image", decode=False)  # closed, but its size is known
    return int(img.width), int(img.height)


def load_mask(
    path: Path,
    expected_size: tuple[int, int] | None = None,
    *,
    image_path: Path | None = None,
) -> np.ndarray:
    """Load a pixel mask as a bool array (H, W); nonzero pixels are defective.

    Colour masks count a pixel as defective when any colour channel is nonzero (alpha is
    ignored). For lossy JPEG masks, values above 127 count, so compression noise is ignored.

    Args:
        path: the mask file.
        expected_size: (width, height) of the image the mask belongs to, checked when given.
        image_path: the image, named in the error message on a size mismatch.

    Raises:
        DataError: unreadable mask, or its size differs from ``expected_size``.
    """
    path = Path(path)
    img = open_image(path, "mask")
    if expected_size is not None and tuple(img.size) != tuple(expected_size):
        w, h = img.size
        ew, eh = expected_size
        image = f"image {image_path}" if image_path is not None else "its image"
        raise DataError(
            f"mask {path} is {w}x{h} but {image} is {ew}x{eh}; "
            "re-export the mask at the image's resolution"
        )
    threshold = 127 if path.suffix.lower() in _LOSSY_EXTENSIONS else 0
    if img.mode in ("1", "L") or img.mode.startswith("I") or img.mode == "F":
        values = np.asarray(img)
        if img.mode == "F":
            values = np.nan_to_num(values)
        return np.asarray(values > threshold, dtype=bool)
    try:
        rgb = np.asarray(img.convert("RGB"))
    except (ValueError, OSError) as exc:
        raise DataError(
            f"cannot read mask {path}: unsupported colour mode {img.mode}; "
            "re-export it as a grayscale PNG"
        ) from exc
    return np.asarray((rgb > threshold).any(axis=-1), dtype=bool)
