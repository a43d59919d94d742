"""`rstpm check`: validate a dataset before training, without stopping at the first problem.

Every image is decoded (as `fit` and `test` will), every mask is read and compared with its
image, and the result is a :class:`CheckReport`: counts per split and defect type, image sizes
and colour modes, the non-image files that the other verbs skip, and every problem found. An
*error* is something that makes `rstpm fit` or `rstpm test` stop (the same one-line message they
would print); a *warning* is something they accept but you may want to fix.

Layouts (as :mod:`rstpm.data` reads them):

* an MVTec AD category: ``train/good/``, ``test/<type>/``, ``ground_truth/<type>/`` (or the
  mask folder given with ``--masks``);
* a generic test folder: sub-folders (``good/`` and ``<type>/``) and no images beside them,
  masks optional (``--masks``);
* otherwise a folder of normal training images.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rstpm.config import Config
from rstpm.data.images import IMAGE_EXTENSIONS, DataError, open_image
from rstpm.data.layout import GOOD, find_mask, is_mvtec_category, scan_folder

__all__ = ["CheckReport", "Finding", "FolderCount", "SizeStats", "check_dataset"]

LAYOUTS = {
    "mvtec": "MVTec AD category",
    "test-folder": "generic test folder (good/ and one sub-folder per defect type)",
    "train-folder": "folder of normal training images",
}


@dataclass(frozen=True)
class Finding:
    """One problem: ``path`` is the file or folder concerned, ``message`` one line naming it."""

    path: str
    message: str


@dataclass
class FolderCount:
    """The images of one folder of the dataset.

    Attributes:
        split: ``train`` or ``test``.
        defect_type: ``good`` or the defect type.
        folder: the folder, as a string.
        images: image files found (readable or not).
        unreadable: those that cannot be decoded.
        masks: masks found for them (None where masks are not expected: good images, no masks).
    """

    split: str
    defect_type: str
    folder: str
    images: int = 0
    unreadable: int = 0
    masks: int | None = None


@dataclass
class SizeStats:
    """Sizes (W x H) and colour modes of the readable images."""

    n: int = 0
    smallest: tuple[int, int] | None = None
    largest: tuple[int, int] | None = None
    most_common: tuple[int, int] | None = None
    most_common_count: int = 0
    distinct: int = 0
    modes: dict[str, int] = field(default_factory=dict)

    @classmethod
    def of(cls, sizes: list[tuple[int, int]], modes: list[str]) -> SizeStats:
        if not sizes:
            return cls(modes=dict(Counter(modes)))
        counts = Counter(sizes)
        by_area = sorted(counts, key=lambda s: (s[0] * s[1], s))
        common, n_common = counts.most_common(1)[0]
        return cls(
            n=len(sizes),
            smallest=by_area[0],
            largest=by_area[-1],
            most_common=common,
            most_common_count=n_common,
            distinct=len(counts),
            modes=dict(sorted(Counter(modes).items(), key=lambda kv: (-kv[1], kv[0]))),
        )


@dataclass
class CheckReport:
    """The result of :func:`check_dataset`; :attr:`ok` is False when there is any error."""

    root: str
    layout: str
    folders: list[FolderCount] = field(default_factory=list)
    sizes: SizeStats = field(default_factory=SizeStats)
    skipped: list[str] = field(default_factory=list)
    errors: list[Finding] = field(default_factory=list)
    warnings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def count(self, split: str, defect_type: str | None = None) -> int:
        """Images of a split (and defect type)."""
        return sum(
            f.images
            for f in self.folders
            if f.split == split and (defect_type is None or f.defect_type == defect_type)
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: every field, plus ``ok`` and the layout's description."""
        data = asdict(self)
        data["ok"] = self.ok
        data["layout_description"] = LAYOUTS[self.layout]
        return data

    def format(self) -> str:
        """The human-readable report that ``rstpm check`` prints."""
        lines = [f"dataset {self.root}: {LAYOUTS[self.layout]}"]
        for f in self.folders:
            name = f"{f.split}/{f.defect_type}" if self.layout != "train-folder" else "images"
            text = f"  {name:<24} {f.images:>6} image{'s' if f.images != 1 else ''}"
            if f.unreadable:
                text += f", {f.unreadable} unreadable"
            if f.masks is not None:
                text += f", {f.masks} mask{'s' if f.masks != 1 else ''}"
            lines.append(text)
        s = self.sizes
        if s.n:

            def wh(size: tuple[int, int] | None) -> str:
                return f"{size[0]}x{size[1]}" if size else "-"

            if s.distinct == 1:
                lines.append(f"  image size: {wh(s.most_common)} (all {s.n})")
            else:
                lines.append(
                    f"  image sizes: {s.distinct} different, smallest {wh(s.smallest)}, "
                    f"largest {wh(s.largest)}, most common {wh(s.most_common)} "
                    f"({s.most_common_count} of {s.n}); all are resized to --image-size"
                )
            lines.append("  colour modes: " + ", ".join(f"{m} {n}" for m, n in s.modes.items()))
        if self.skipped:
            shown = ", ".join(self.skipped[:10]) + (", ..." if len(self.skipped) > 10 else "")
            lines.append(f"  skipped {len(self.skipped)} non-image file(s): {shown}")
        for title, findings in (("warning", self.warnings), ("error", self.errors)):
            for finding in findings:
                lines.append(f"{title}: {finding.message}")
        n_err, n_warn = len(self.errors), len(self.warnings)
        verdict = "OK" if self.ok else "PROBLEMS: fix the errors before `rstpm fit` / `rstpm test`"
        lines.append(
            f"{verdict} ({n_err} error{'s' if n_err != 1 else ''}, "
            f"{n_warn} warning{'s' if n_warn != 1 else ''})"
        )
        return "\n".join(lines)


class _Checker:
    def __init__(self, root: Path, layout: str) -> None:
        self.report = CheckReport(root=str(root), layout=layout)
        self.sizes: list[tuple[int, int]] = []
        self.modes: list[str] = []

    def error(self, path: Path, message: str) -> None:
        self.report.errors.append(Finding(str(path), " ".join(message.split())))

    def warn(self, path: Path, message: str) -> None:
        self.report.warnings.append(Finding(str(path), " ".join(message.split())))

    def images(self, folder: Path, split: str, defect_type: str) -> tuple[FolderCount, dict]:
        """Scan and decode the images of ``folder``; {path: (W, H)} of the readable ones."""
        count = FolderCount(split, defect_type, str(folder))
        self.report.folders.append(count)
        try:
            scan = scan_folder(folder)
        except DataError as error:
            self.error(folder, str(error))
            return count, {}
        self.report.skipped.extend(str(folder / name) for name in scan.skipped)
        count.images = len(scan.images)
        if not scan.images:
            exts = ", ".join(sorted(IMAGE_EXTENSIONS))
            self.error(folder, f"folder {folder} contains no images ({exts}); add images")
        stems = Counter(p.stem for p in scan.images) if split == "test" else Counter()
        for stem, n in sorted(stems.items()):
            if n > 1:
                names = ", ".join(p.name for p in scan.images if p.stem == stem)
                self.warn(
                    folder / stem,
                    f"{n} images in {folder} share the name {stem} ({names}): their anomaly "
                    "maps and masks are looked up by name; rename them",
                )
        readable: dict[Path, tuple[int, int]] = {}
        for path in scan.images:
            try:
                img = open_image(path)
            except DataError as error:
                count.unreadable += 1
                self.error(path, str(error))
                continue
            readable[path] = img.size
            self.sizes.append(img.size)
            self.modes.append(img.mode)
        return count, readable

    def masks(
        self,
        count: FolderCount,
        images: dict[Path, tuple[int, int]],
        all_images: list[Path],
        mask_dir: Path,
    ) -> None:
        """Find, read and compare the mask of every defective image of one folder."""
        count.masks = 0
        if not mask_dir.is_dir():
            self.error(
                mask_dir,
                f"mask folder {mask_dir} does not exist: the {len(all_images)} defective "
                f"image(s) of {count.folder} have no masks; add the masks",
            )
            return
        used: set[Path] = set()
        for path in all_images:
            mask = find_mask(mask_dir, path.stem)
            if mask is None:
                expected = mask_dir / f"{path.stem}_mask.png"
                self.error(
                    path,
                    f"defective image {path} has no mask (expected {expected}); add the mask or "
                    "remove the image",
                )
                continue
            used.add(mask)
            count.masks += 1
            try:
                img = open_image(mask, "mask")
            except DataError as error:
                self.error(mask, str(error))
                continue
            size = images.get(path)
            if size is not None and tuple(img.size) != tuple(size):
                self.error(
                    mask,
                    f"mask {mask} is {img.size[0]}x{img.size[1]} but image {path} is "
                    f"{size[0]}x{size[1]}; re-export the mask at the image's resolution",
                )
            values = np.unique(np.asarray(img.convert("L") if img.mode == "P" else img))
            if values.size > 2:
                self.warn(
                    mask,
                    f"mask {mask} is not binary ({values.size} distinct values): every nonzero "
                    "pixel counts as defective (above 127 for JPEG masks)",
                )
            elif not values.any():
                self.warn(
                    mask,
                    f"mask {mask} is empty (no defective pixel) for defective image {path}",
                )
        try:
            orphans = [p for p in scan_folder(mask_dir).images if p not in used]
        except DataError:
            orphans = []
        if orphans:
            shown = ", ".join(p.name for p in orphans[:5]) + (", ..." if len(orphans) > 5 else "")
            self.warn(
                mask_dir,
                f"{len(orphans)} mask(s) in {mask_dir} belong to no image and are ignored: {shown}",
            )


def _layout(root: Path) -> str:
    if is_mvtec_category(root):
        return "mvtec"
    if scan_folder(root).images or not _type_dirs(root):
        return "train-folder"
    return "test-folder"


def _type_dirs(folder: Path) -> list[Path]:
    dirs = [p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return sorted(dirs, key=lambda p: (p.name != GOOD, p.name))


def _check_training_size(checker: _Checker, folder: Path, n: int) -> None:
    if n == 0:
        return  # already an error: no images
    defaults = Config()
    if n < 2:
        checker.error(
            folder,
            f"{folder} has {n} readable training image: fit needs at least 2 (some are held "
            "out for validation); add more normal images",
        )
        return
    n_val = min(max(round(n * defaults.val_fraction), 1), n - 1)
    n_train = n - n_val
    if n_train < defaults.batch_size:
        checker.warn(
            folder,
            f"{n} normal training images leave {n_train} for training after holding out "
            f"{n_val} for validation, fewer than the default --batch-size "
            f"{defaults.batch_size}; train with --batch-size {n_train} or less, or add images",
        )


def check_dataset(root: Path, mask_root: Path | None = None) -> CheckReport:
    """Check a dataset (see the module docstring for the layouts) and report every problem.

    Raises:
        DataError: ``root`` (or ``mask_root``) does not exist or is not a folder.
    """
    root = Path(root)
    scan_folder(root)  # raises for a missing folder, a file, a broken link
    if mask_root is not None:
        mask_root = Path(mask_root)
        if not mask_root.is_dir():
            scan_folder(mask_root)  # the same one-line error
    layout = _layout(root)
    checker = _Checker(root, layout)

    if layout == "train-folder":
        _, readable = checker.images(root, "train", GOOD)
        _check_training_size(checker, root, len(readable))
        if mask_root is not None:
            checker.warn(mask_root, f"--masks {mask_root} is not used for a training folder")
    else:
        if layout == "mvtec":
            train = root / "train" / GOOD
            if train.is_dir():
                _, readable = checker.images(train, "train", GOOD)
                _check_training_size(checker, train, len(readable))
            else:
                checker.error(
                    train,
                    f"{root} has no train/good/ folder: `rstpm fit` needs normal images there",
                )
            test_dir = root / "test"
            masks_dir = mask_root if mask_root is not None else root / "ground_truth"
            if mask_root is None and not masks_dir.is_dir():
                checker.warn(
                    masks_dir,
                    f"{root} has no ground_truth/ folder: defective images have no masks, "
                    "so `rstpm test` reports image-level metrics only",
                )
                masks_dir = None
        else:
            test_dir, masks_dir = root, mask_root
        if not test_dir.is_dir():
            checker.warn(test_dir, f"{root} has no test/ folder: `rstpm test` cannot run on it")
        else:
            type_dirs = _type_dirs(test_dir)
            if not type_dirs:
                checker.error(
                    test_dir,
                    f"folder {test_dir} has no sub-folders; put normal test images in good/ and "
                    "defective ones in one sub-folder per defect type",
                )
            elif GOOD not in {p.name for p in type_dirs}:
                checker.warn(
                    test_dir / GOOD,
                    f"{test_dir} has no good/ folder: image AUROC needs normal test images",
                )
            for type_dir in type_dirs:
                count, readable = checker.images(type_dir, "test", type_dir.name)
                if type_dir.name == GOOD or masks_dir is None:
                    continue
                try:
                    all_images = scan_folder(type_dir).images
                except DataError:
                    continue
                checker.masks(count, readable, all_images, masks_dir / type_dir.name)
            if layout == "test-folder" and mask_root is None:
                n_defective = sum(f.images for f in checker.report.folders if f.defect_type != GOOD)
                if n_defective:
                    checker.warn(
                        root,
                        "no --masks given: defective images have no masks, so `rstpm test` "
                        "reports image-level metrics only",
                    )

    report = checker.report
    report.sizes = SizeStats.of(checker.sizes, checker.modes)
    report.skipped.sort()
    if report.skipped:
        shown = ", ".join(Path(p).name for p in report.skipped[:5])
        more = ", ..." if len(report.skipped) > 5 else ""
        checker.warn(
            root,
            f"{len(report.skipped)} non-image file(s) are skipped by every verb: {shown}{more}",
        )
    return report
