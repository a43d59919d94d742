"""Image data: folder layouts, robust image and mask loading, datasets and loaders.

Two layouts are understood:

* an **MVTec AD category**::

      <category>/train/good/*.png
      <category>/test/good/*.png
      <category>/test/<defect_type>/NNN.png
      <category>/ground_truth/<defect_type>/NNN_mask.png

* a **generic folder layout**: training images are a plain folder of normal images, and a test
  folder holds ``good/`` and one sub-folder per defect type; pixel masks are optional and looked
  up under a separate mask root.

All errors caused by the user's data raise :class:`DataError`, whose message is one line that
names the offending file and says what to do. The input policy shared by every verb (what is
skipped, what is an error, what just works) is written down in ``docs/input-policy.md``.

Images larger than :func:`max_image_pixels` (default :data:`MAX_IMAGE_PIXELS`, overridable with
the environment variable ``RSTPM_MAX_IMAGE_PIXELS``) are refused before they are decoded: a guard
against decompression bombs. rstpm sets PIL's own ``Image.MAX_IMAGE_PIXELS`` to the same limit
before each read.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

__all__ = [
    "IMAGE_EXTENSIONS",
    "MAX_IMAGE_PIXELS",
    "MAX_PIXELS_ENV",
    "Batch",
    "DataError",
    "FolderScan",
    "ImageDataset",
    "Sample",
    "check_file",
    "collate_batch",
    "image_size",
    "is_mvtec_category",
    "list_images",
    "list_test_samples",
    "list_train_samples",
    "load_all_images",
    "load_image",
    "load_mask",
    "find_mask",
    "make_loader",
    "max_image_pixels",
    "open_image",
    "scan_folder",
    "split_train_val",
]

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
"""File extensions treated as images (compared case-insensitively)."""

MAX_IMAGE_PIXELS = 100_000_000
"""Default largest image (width x height) rstpm decodes; larger files are refused, unread."""

MAX_PIXELS_ENV = "RSTPM_MAX_IMAGE_PIXELS"
"""Environment variable that overrides :data:`MAX_IMAGE_PIXELS` (a positive whole number)."""

GOOD = "good"

# Files that operating systems drop into folders; skipped without a warning.
_JUNK_NAMES = {"thumbs.db", "desktop.ini"}
_LOSSY_EXTENSIONS = {".jpg", ".jpeg"}
_MASK_SUFFIXES = ("_mask", "")


class DataError(ValueError):
    """A problem with the user's data; the message is one line naming the file and the fix."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


@dataclass(frozen=True)
class Sample:
    """One image of a data set.

    Attributes:
        path: the image file.
        defect_type: ``"good"`` for normal images, else the name of the defect type.
        mask_path: the pixel ground truth, or None for good images and when no mask exists.
    """

    path: Path
    defect_type: str
    mask_path: Path | None = None

    @property
    def label(self) -> int:
        """0 for a good image, 1 for a defective one."""
        return 0 if self.defect_type == GOOD else 1


# --------------------------------------------------------------------------------------------
# Layouts
# --------------------------------------------------------------------------------------------


def _is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def _is_ignored_name(name: str) -> bool:
    # Hidden files include macOS "._001.png" resource forks, which are not images.
    return name.startswith(".") or name.lower() in _JUNK_NAMES


def _is_dangling(path: Path) -> bool:
    return path.is_symlink() and not path.exists()


def _require_folder(folder: Path, what: str = "folder") -> None:
    if folder.is_dir():
        return
    if _is_dangling(folder):
        raise DataError(
            f"{what} {folder} is a broken symbolic link (to {os.readlink(folder)}); "
            "fix the link or the path"
        )
    if folder.exists():
        raise DataError(f"{what} {folder} is a file, not a folder; give the folder of images")
    raise DataError(f"{what} {folder} does not exist; check the path")


def _subfolders(folder: Path) -> list[Path]:
    return sorted(
        (p for p in folder.iterdir() if p.is_dir() and not _is_ignored_name(p.name)),
        key=lambda p: p.name,
    )


def _type_order(name: str) -> tuple[int, str]:
    return (0 if name == GOOD else 1, name)


def is_mvtec_category(root: Path) -> bool:
    """True when ``root`` looks like an MVTec AD category (has ``train/good/`` or ``test/``)."""
    root = Path(root)
    return (root / "train" / GOOD).is_dir() or (root / "test").is_dir()


@dataclass(frozen=True)
class FolderScan:
    """The files directly inside a folder, sorted by name.

    Attributes:
        images: files with an image extension (any letter case), including broken symbolic
            links with such a name (reading them fails with an error that names the link).
        skipped: names of the other files (not hidden, not folders), which are not images.
    """

    images: list[Path]
    skipped: list[str]


def scan_folder(folder: Path) -> FolderScan:
    """Sort the entries of ``folder`` (not recursive) into images and skipped non-images.

    Hidden files (including macOS ``._*`` resource forks), ``Thumbs.db``/``desktop.ini`` and
    sub-folders are left out silently. Nothing is read; no warning is given.

    Raises:
        DataError: the folder does not exist or is not a folder.
    """
    folder = Path(folder)
    _require_folder(folder)
    images: list[Path] = []
    skipped: list[str] = []
    for entry in folder.iterdir():
        if _is_ignored_name(entry.name) or entry.is_dir():
            continue
        if _is_image_name(entry) and (entry.is_file() or _is_dangling(entry)):
            images.append(entry)
        else:
            skipped.append(entry.name)
    return FolderScan(sorted(images, key=lambda p: p.name), sorted(skipped))


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name (not recursive).

    Files with other extensions are skipped with a warning; hidden files (including macOS
    ``._*`` resource forks) and sub-folders are skipped silently. A broken symbolic link with an
    image name is listed: reading it raises a :class:`DataError` that names it.

    Raises:
        DataError: the folder does not exist or holds no image.
    """
    folder = Path(folder)
    scan = scan_folder(folder)
    if scan.skipped:
        shown = ", ".join(scan.skipped[:5]) + (", ..." if len(scan.skipped) > 5 else "")
        warnings.warn(
            f"skipping {len(scan.skipped)} non-image file(s) in {folder}: {shown}",
            UserWarning,
            stacklevel=2,
        )
    if not scan.images:
        exts = ", ".join(sorted(IMAGE_EXTENSIONS))
        raise DataError(f"folder {folder} contains no images ({exts}); add images or fix the path")
    return scan.images


def check_file(path: Path, what: str = "image") -> None:
    """Cheap checks of an image file without reading it: it exists, is not a broken symbolic
    link, not a folder and not empty.

    Raises:
        DataError: one line naming the file and what to do.
    """
    path = Path(path)
    if _is_dangling(path):
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


def list_train_samples(root: Path) -> list[Sample]:
    """Normal training images: ``root/train/good/*`` for an MVTec category, else ``root/*``.

    Every file's header is read (:func:`image_size`, nothing decoded): a broken symbolic link,
    an empty file, a file that is not an image or an image above :func:`max_image_pixels` is an
    error here, before any training starts; a truncated file is found when it is decoded.

    Raises:
        DataError: a missing folder, no images, or a bad file (named).
    """
    root = Path(root)
    _require_folder(root)
    folder = root / "train" / GOOD if is_mvtec_category(root) else root
    if not folder.is_dir():
        raise DataError(
            f"MVTec category {root} has no train/good/ folder; put the normal training images there"
        )
    samples = [Sample(path, GOOD, None) for path in list_images(folder)]
    for sample in samples:
        image_size(sample.path)
    return samples


def _mask_index(folder: Path) -> dict[tuple[str, str], Path]:
    """Map (stem, lower-case extension) -> path for the image files in ``folder`` (broken links
    included, so that reading them names them)."""
    if not folder.is_dir():
        return {}
    return {(p.stem, p.suffix.lower()): p for p in scan_folder(folder).images}


def _find_mask(index: dict[tuple[str, str], Path], stem: str) -> Path | None:
    exts = [".png", *sorted(IMAGE_EXTENSIONS - {".png"})]
    for suffix in _MASK_SUFFIXES:
        for ext in exts:
            found = index.get((stem + suffix, ext))
            if found is not None:
                return found
    return None


def find_mask(folder: Path, stem: str) -> Path | None:
    """The mask of image ``stem`` in ``folder``: ``<stem>_mask.<ext>``, else ``<stem>.<ext>``
    (``.png`` preferred, any image extension in any letter case); None when there is none."""
    return _find_mask(_mask_index(Path(folder)), stem)


def list_test_samples(root: Path, mask_root: Path | None = None) -> list[Sample]:
    """Test images with their labels and pixel masks.

    For an MVTec category, images come from ``root/test/<type>/`` and masks from
    ``ground_truth/<type>/<stem>_mask.png`` (under ``mask_root`` when given, else under
    ``root/ground_truth``); every defective image must have a mask. A category without a
    ``ground_truth/`` folder (and no ``mask_root``) is evaluated without masks, with a warning.

    For the generic layout, images come from ``root/good/`` and ``root/<type>/``. When
    ``mask_root`` is given, each defective image needs ``mask_root/<type>/<stem>_mask.<ext>`` or
    ``mask_root/<type>/<stem>.<ext>``; without it, defective samples get ``mask_path=None``
    (image-level metrics only).

    Samples are ordered by defect type ("good" first, then by name), then by file name. Every
    image is checked without being decoded (:func:`check_file`).

    Raises:
        DataError: missing folders, empty folders, a broken link or empty file, or a defective
            image without its mask.
    """
    root = Path(root)
    _require_folder(root)
    if mask_root is not None:
        _require_folder(Path(mask_root), "mask folder")
    if is_mvtec_category(root):
        test_dir = root / "test"
        if not test_dir.is_dir():
            raise DataError(
                f"MVTec category {root} has no test/ folder; add test/good and test/<defect_type>"
            )
        masks_dir: Path | None = Path(mask_root) if mask_root is not None else root / "ground_truth"
        if mask_root is None and not masks_dir.is_dir():
            warnings.warn(
                f"MVTec category {root} has no ground_truth/ folder: defective images have no "
                "masks, so only image-level metrics are computed",
                UserWarning,
                stacklevel=2,
            )
            masks_dir = None
    else:
        test_dir = root
        masks_dir = Path(mask_root) if mask_root is not None else None

    type_dirs = sorted(_subfolders(test_dir), key=lambda p: _type_order(p.name))
    if not type_dirs:
        raise DataError(
            f"folder {test_dir} has no sub-folders; put normal test images in good/ and "
            "defective ones in one sub-folder per defect type"
        )
    loose = [p for p in test_dir.iterdir() if p.is_file() and _is_image_name(p)]
    if loose and test_dir == root:
        warnings.warn(
            f"ignoring {len(loose)} image(s) directly in {test_dir}: test images must be in "
            "good/ or <defect_type>/ sub-folders",
            UserWarning,
            stacklevel=2,
        )

    samples: list[Sample] = []
    for type_dir in type_dirs:
        defect_type = type_dir.name
        images = list_images(type_dir)
        for path in images:
            check_file(path)
        if defect_type == GOOD or masks_dir is None:
            samples.extend(Sample(path, defect_type, None) for path in images)
            continue
        index = _mask_index(masks_dir / defect_type)
        for path in images:
            mask = _find_mask(index, path.stem)
            if mask is None:
                expected = masks_dir / defect_type / f"{path.stem}_mask.png"
                raise DataError(
                    f"defective image {path} has no mask (expected {expected}); add the mask "
                    "or remove the image"
                )
            samples.append(Sample(path, defect_type, mask))
    return samples


# --------------------------------------------------------------------------------------------
# Images and masks
# --------------------------------------------------------------------------------------------


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
    return DataError(
        f"cannot read {what} {path}: {size}, more than rstpm's limit of {limit:,} pixels (a "
        "guard against decompression bombs); if the file is trusted, raise the limit with the "
        f"environment variable {MAX_PIXELS_ENV} (e.g. {MAX_PIXELS_ENV}={example}), or downscale "
        "the image"
    )


def _read_error(path: Path, exc: BaseException, what: str = "image") -> DataError:
    if isinstance(exc, UnidentifiedImageError):
        reason = "not an image file PIL can decode (PNG, JPEG, BMP, TIFF)"
    else:
        reason = str(exc) or type(exc).__name__
    return DataError(f"cannot read {what} {path}: {reason}; re-export or remove the file")


def _open_guarded(path: Path, what: str, decode: bool) -> Image.Image:
    """Open an image after :func:`check_file`, refuse it above :func:`max_image_pixels` before
    decoding, and decode it fully when ``decode`` (first frame, detached from the file)."""
    check_file(path, what)
    limit = max_image_pixels()
    Image.MAX_IMAGE_PIXELS = limit  # PIL warns above it, raises above twice it
    try:
        with warnings.catch_warnings():
            # rstpm's own check below replaces PIL's warning with an error.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                width, height = img.size
                pixels = width * height
                if pixels > limit:
                    size = f"it is {width}x{height} = {pixels:,} pixels"
                    raise _bomb_error(path, what, size, pixels, limit)
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
        raise _bomb_error(path, what, size, pixels, limit) from exc
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        raise _read_error(path, exc, what) from exc


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


# --------------------------------------------------------------------------------------------
# Datasets and loaders
# --------------------------------------------------------------------------------------------


@dataclass
class Batch:
    """A collated batch of images.

    Attributes:
        image: (B, 3, H, W) float tensor in [0, 1].
        label: (B,) long tensor, 0 good and 1 defective.
        defect_type: the defect type of each image ("good" for normal ones).
        path: the file of each image, as strings.
        index: (B,) long tensor, the position of each image in its dataset.
    """

    image: torch.Tensor
    label: torch.Tensor
    defect_type: list[str]
    path: list[str]
    index: torch.Tensor

    def __len__(self) -> int:
        return int(self.image.shape[0])

    def to(self, device: torch.device | str) -> Batch:
        """A copy whose tensors are on ``device``."""
        return Batch(
            image=self.image.to(device),
            label=self.label.to(device),
            defect_type=list(self.defect_type),
            path=list(self.path),
            index=self.index.to(device),
        )


def collate_batch(items: Sequence[dict[str, Any]]) -> Batch:
    """Stack the dicts returned by :class:`ImageDataset` into a :class:`Batch`."""
    if not items:
        raise ValueError("cannot collate an empty batch")
    return Batch(
        image=torch.stack([item["image"] for item in items]),
        label=torch.tensor([int(item["label"]) for item in items], dtype=torch.long),
        defect_type=[str(item["defect_type"]) for item in items],
        path=[str(item["path"]) for item in items],
        index=torch.tensor([int(item["index"]) for item in items], dtype=torch.long),
    )


class ImageDataset(Dataset):
    """Images of a list of samples, resized to ``image_size x image_size``.

    ``__getitem__`` returns a dict with keys ``image`` ((3,S,S) float tensor), ``label`` (int),
    ``defect_type`` (str), ``path`` (str) and ``index`` (int). Pass ``images`` (e.g. from
    :func:`load_all_images`) to serve pre-loaded tensors instead of reading files.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        image_size: int,
        *,
        images: torch.Tensor | None = None,
    ) -> None:
        self.samples = list(samples)
        self.image_size = int(image_size)
        if self.image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")
        if images is not None:
            expected = (len(self.samples), 3, self.image_size, self.image_size)
            if tuple(images.shape) != expected:
                raise ValueError(
                    f"pre-loaded images have shape {tuple(images.shape)}, expected {expected}"
                )
        self.images = images

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.samples[index]
        if self.images is not None:
            image = self.images[index]
        else:
            image = load_image(sample.path, self.image_size)
        return {
            "image": image,
            "label": sample.label,
            "defect_type": sample.defect_type,
            "path": str(sample.path),
            "index": int(index),
        }


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    seed: int | None = None,
    num_workers: int = 0,
    drop_last: bool = False,
) -> DataLoader:
    """A DataLoader yielding :class:`Batch` objects; ``seed`` makes shuffling reproducible."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    generator = None
    if seed is not None:
        generator = torch.Generator()
        generator.manual_seed(int(seed))
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        drop_last=drop_last,
        collate_fn=collate_batch,
        generator=generator,
    )


def load_all_images(
    samples: Sequence[Sample], image_size: int, progress: bool = False
) -> torch.Tensor:
    """Load and resize every sample's image into one (N, 3, S, S) float tensor."""
    samples = list(samples)
    out = torch.empty((len(samples), 3, image_size, image_size), dtype=torch.float32)
    iterator: Any = samples
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(samples, desc="loading images", unit="img")
    for i, sample in enumerate(iterator):
        out[i] = load_image(sample.path, image_size)
    return out


def split_train_val(
    samples: Sequence[Sample], val_fraction: float = 0.2, seed: int = 0
) -> tuple[list[Sample], list[Sample]]:
    """Deterministic random split into (train, val), each keeping the input order.

    The validation part has ``round(n * val_fraction)`` samples, clamped so that both parts
    hold at least one sample.

    Raises:
        DataError: fewer than 2 samples.
        ValueError: ``val_fraction`` outside (0, 1).
    """
    samples = list(samples)
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    n = len(samples)
    if n < 2:
        where = f" ({samples[0].path})" if samples else ""
        raise DataError(
            f"need at least 2 training images to hold some out for validation, got {n}{where}; "
            "add more normal images"
        )
    n_val = min(max(round(n * val_fraction), 1), n - 1)
    order = np.random.default_rng(seed).permutation(n)
    val_idx = set(order[:n_val].tolist())
    train = [s for i, s in enumerate(samples) if i not in val_idx]
    val = [s for i, s in enumerate(samples) if i in val_idx]
    return train, val
