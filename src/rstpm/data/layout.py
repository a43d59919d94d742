"""Folder layouts: which files are training images, test images and masks.


Two layouts are understood:

* an **MVTec AD category**::

      <category>/train/good/*.png
      <category>/test/good/*.png
      <category>/test/<defect_type>/NNN.png
      <category>/ground_truth/<defect_type>/NNN_mask.png

* a **generic folder layout**: training images are a plain folder of normal images, and a test
  folder holds ``good/`` and one sub-folder per defect type; pixel masks are optional and looked
  up under a separate mask root.

"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rstpm.data.images import IMAGE_EXTENSIONS, DataError, check_file, image_size, is_dangling

GOOD = "good"

# Files that operating systems drop into folders; skipped without a warning.
_JUNK_NAMES = {"thumbs.db", "desktop.ini"}
_MASK_SUFFIXES = ("_mask", "")


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


def _require_folder(folder: Path, what: str = "folder") -> None:
    if folder.is_dir():
        return
    if is_dangling(folder):
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


def scan_folder(folder: Path, recursive: bool = False) -> FolderScan:
    """Sort the entries of ``folder`` into images and skipped non-images; with ``recursive``,
    those of its sub-folders too (skipped names then relative to ``folder``; linked folders are
    not followed).

    Hidden files and folders (including macOS ``._*`` resource forks), ``Thumbs.db`` /
    ``desktop.ini`` and (unless ``recursive``) sub-folders are left out silently. Nothing is
    read; no warning is given.

    Raises:
        DataError: the folder does not exist or is not a folder.
    """
    folder = Path(folder)
    _require_folder(folder)
    images: list[Path] = []
    skipped: list[str] = []
    pending = [folder]
    while pending:
        current = pending.pop()
        for entry in current.iterdir():
            if _is_ignored_name(entry.name):
                continue
            if entry.is_dir():
                if recursive and not entry.is_symlink():
                    pending.append(entry)
            elif _is_image_name(entry) and (entry.is_file() or is_dangling(entry)):
                images.append(entry)
            else:
                skipped.append(str(entry.relative_to(folder)))
    return FolderScan(sorted(images, key=lambda p: p.relative_to(folder).parts), sorted(skipped))


def list_images(folder: Path, recursive: bool = False) -> list[Path]:
    """Image files directly inside ``folder`` (and with ``recursive`` in its sub-folders),
    sorted by relative path.

    Files with other extensions are skipped with a warning; hidden files (including macOS
    ``._*`` resource forks) and sub-folders are skipped silently. A broken symbolic link with an
    image name is listed: reading it raises a :class:`DataError` that names it.

    Raises:
        DataError: the folder does not exist or holds no image.
    """
    folder = Path(folder)
    scan = scan_folder(folder, recursive)
    if scan.skipped:
        shown = ", ".join(scan.skipped[:5]) + (", ..." if len(scan.skipped) > 5 else "")
        warnings.warn(
            f"skipping {len(scan.skipped)} non-image file(s) in {folder}: {shown}",
            UserWarning,
            stacklevel=2,
        )
    if not scan.images:
        exts = ", ".join(sorted(IMAGE_EXTENSIONS))
        where = " or its sub-folders" if recursive else ""
        raise DataError(
            f"folder {folder}{where} contains no images ({exts}); add images or fix the path"
        )
    return scan.images


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
