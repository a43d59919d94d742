"""RSTPM as a plain ``torch.nn.Module``: two frozen teachers, two students, attention, and the
discriminative network.

Pair 1 (STPM): T1 and S1 (same architecture, S1 random) at strides 4, 8, 16 -> Omega^1..Omega^3.
Pair 2: S2 (decoder.py) reconstructs T2's strides 16, 8, 4 from T1's stride 32 -> Omega^4..Omega^6.
Discriminative stage (discriminative.py): Omega^7 from the per-resolution sums of Eq. 5.
Beyond the paper (memory_bank.py, set by :meth:`RSTPM.set_memory`): Omega^8 from T1's patches.
No training loop lives here (rstpm.training), and no file: the networks are built with their
weights by rstpm.runs.teachers.build_model. The teachers stay frozen in eval mode.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from rstpm.core.attention import TeacherAttention
from rstpm.core.backbones import FeaturePyramid, freeze
from rstpm.core.decoder import ReconstructionDecoder
from rstpm.core.discriminative import DiscriminativeStage
from rstpm.core.fusion import NEEDS_OMEGA7, NEEDS_OMEGA8, check_variant, fuse
from rstpm.core.losses import distance_map
from rstpm.core.memory_bank import MemoryBank
from rstpm.core.precision import autocast
from rstpm.core.smoothing import gaussian_blur

PAIR1_STRIDES = (4, 8, 16)
T1_STRIDES = (4, 8, 16, 32)
T2_STRIDES = (4, 8, 16)


@dataclass
class Inference:
    """One forward pass of :meth:`RSTPM.infer`."""

    anomaly_map: torch.Tensor  # (B, H, W) the variant's fused, smoothed map at the input size
    score: torch.Tensor  # (B,) image scores: the map's maximum
    omegas: list[torch.Tensor] | None = None  # Omega^1..6 (Eq. 2) at their own strides
    omega7: torch.Tensor | None = None  # (B, H, W) the discriminative map, when computed
    omega8: torch.Tensor | None = None  # (B, h, w) the memory's map at stride 8, when computed


@dataclass
class TeacherFeatures:
    """The frozen teachers' maps of a batch: t1 at strides 4, 8, 16, 32; t2 at 4, 8, 16."""

    t1: list[torch.Tensor]
    t2: list[torch.Tensor]

    def select(self, index: torch.Tensor) -> TeacherFeatures:
        return TeacherFeatures([f[index] for f in self.t1], [f[index] for f in self.t2])

    @staticmethod
    def concat(parts: list[TeacherFeatures]) -> TeacherFeatures:
        t1 = [torch.cat([p.t1[i] for p in parts]) for i in range(len(parts[0].t1))]
        t2 = [torch.cat([p.t2[i] for p in parts]) for i in range(len(parts[0].t2))]
        return TeacherFeatures(t1, t2)


class RSTPM(nn.Module):
    """Teachers T1, T2 (frozen), students S1, S2 and the teacher attention."""

    def __init__(
        self,
        teacher1: FeaturePyramid,
        teacher2: FeaturePyramid,
        student1: FeaturePyramid,
        attention: str = "pair2",
        decoder_widths: tuple[int, ...] = (256, 128, 64),
        discriminator: DiscriminativeStage | None = None,
    ) -> None:
        super().__init__()
        self.teacher1 = freeze(teacher1)
        self.teacher2 = freeze(teacher2)
        self.student1 = student1
        t2_coarse_to_fine = list(reversed(teacher2.channels))  # strides 16, 8, 4
        self.student2 = ReconstructionDecoder(
            in_channels=teacher1.channels[-1],
            out_channels=t2_coarse_to_fine,
            widths=decoder_widths,
            attention_channels=t2_coarse_to_fine if attention in ("pair2", "both") else None,
        )
        self.pair1_attention = (
            nn.ModuleList(TeacherAttention(c) for c in teacher1.channels[:3])
            if attention == "both"
            else None
        )
        self.attention = attention
        self.discriminator = discriminator
        self.memory: MemoryBank | None = None  # Omega^8, built after training (set_memory)
        # Eq. 5's additions on a common scale (Config.fusion "normalised"): Omega^1..6 are each
        # divided by a high quantile of their values on held-out normal images before the fusion
        # and the discriminative network see them; ones (the default) are the paper's plain sums
        self.register_buffer("fusion_scales", torch.ones(6))
        self.precision = "fp32"  # or "bf16": see precision.py; a runtime choice, not a weight
        self.channels_last = False  # memory layout of activations: see set_channels_last

    def set_precision(self, precision: str) -> RSTPM:
        """fp32 (exact) or bf16 autocast for every network of the model (precision.py)."""
        autocast(precision)  # validates
        self.precision = precision
        if self.discriminator is not None:
            self.discriminator.precision = precision
        return self

    def set_channels_last(self, enabled: bool) -> RSTPM:
        """Channels-last (NHWC) memory layout of every convolution's weights and inputs.

        oneDNN's convolutions are faster in it on a CPU, most of all with bf16
        (benchmarks/speed.py). Forward maps match NCHW to float32 rounding, but some fp32
        backward kernels are less precise in it (student gradients ~1e-3 from a float64
        reference against ~3e-6 for NCHW on the 2-core EPYC), so it is a switch, off by
        default. A runtime choice, not a weight: saved weights are plain tensors."""
        layout = torch.channels_last if enabled else torch.contiguous_format
        self.to(memory_format=layout)
        self.channels_last = enabled
        if self.discriminator is not None:
            self.discriminator.channels_last = enabled
        return self

    def set_memory(self, memory: MemoryBank | None) -> RSTPM:
        """The memory of normal patches behind Omega^8 (None: none); its tensors are saved with
        the trainable ones."""
        self.memory = memory
        return self

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def students(self) -> list[nn.Module]:
        """The modules trained in the first stage (students and attention)."""
        return [m for m in (self.student1, self.student2, self.pair1_attention) if m is not None]

    def train(self, mode: bool = True) -> RSTPM:
        super().train(mode)
        self.teacher1.eval()
        self.teacher2.eval()
        return self

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Students and attention: everything a run must store (teachers are reloaded)."""
        return {
            k: v
            for k, v in self.state_dict().items()
            if not k.startswith(("teacher1.", "teacher2."))
        }

    @torch.no_grad()
    def teacher_features(self, image: torch.Tensor) -> TeacherFeatures:
        """The frozen teachers' maps of [0, 1] RGB images (cacheable: no augmentation), float32."""
        image = self._layout(image)
        with autocast(self.precision):
            t1, t2 = self.teacher1(image), self.teacher2(image)
        return TeacherFeatures([f.float() for f in t1], [f.float() for f in t2])

    def forward(
        self, image: torch.Tensor, teacher: TeacherFeatures | None = None
    ) -> list[torch.Tensor]:
        """The six per-location anomaly maps Omega^1..Omega^6 (Eq. 2), each (B, h, w).

        Omega^1..3: pair 1 at strides 4, 8, 16. Omega^4..6: pair 2 at strides 16, 8, 4.
        Their spatial means summed are the training loss (Eq. 3-4). ``teacher`` may carry
        precomputed teacher features of ``image`` (the training cache).
        """
        if teacher is None:
            teacher = self.teacher_features(image)
        gate = None
        if self.pair1_attention is not None:
            attention, t1 = self.pair1_attention, teacher.t1

            def gate(level: int, feature: torch.Tensor) -> torch.Tensor:
                return attention[level](feature, t1[level])

        t2_coarse_to_fine = teacher.t2[::-1]
        with autocast(self.precision):
            s1 = self.student1(self._layout(image), gate=gate)
            s2 = self.student2(self._layout(teacher.t1[3]), t2_coarse_to_fine)
        # Eq. 2 in float32 whatever the precision of the features
        pair1 = [distance_map(t, s) for t, s in zip(teacher.t1[:3], s1, strict=True)]
        pair2 = [distance_map(t, s) for t, s in zip(t2_coarse_to_fine, s2, strict=True)]
        return pair1 + pair2

    def scale_omegas(self, omegas: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Omega^1..6 as the fusion (Eq. 5, 7) and the discriminative network take them: each
        divided by its entry of ``fusion_scales`` (ones, the paper's form, leave them exact)."""
        return [omega / scale for omega, scale in zip(omegas, self.fusion_scales, strict=True)]

    def raw_maps(
        self, image: torch.Tensor, variants: Sequence[str]
    ) -> tuple[list[torch.Tensor], torch.Tensor | None, torch.Tensor | None]:
        """Raw Omega^1..6 and, when ``variants`` need them, Omega^7 and Omega^8 (None else)."""
        for variant in variants:
            check_variant(variant, self.discriminator is not None, self.memory is not None)
        size = tuple(image.shape[-2:])
        teacher = self.teacher_features(image)
        raw = self(image, teacher)
        omega7 = omega8 = None
        if any(v in NEEDS_OMEGA7 for v in variants):
            omega7 = self.discriminator.omega7(self.scale_omegas(raw), size)
        if any(v in NEEDS_OMEGA8 for v in variants):
            omega8 = self.memory(teacher.t1)
        return raw, omega7, omega8

    def _fuse(
        self,
        variant: str,
        raw: list[torch.Tensor],
        size: tuple[int, int],
        omega7: torch.Tensor | None,
        omega8: torch.Tensor | None,
    ) -> torch.Tensor:
        scales = self.memory.scales if self.memory is not None else None
        return fuse(variant, self.scale_omegas(raw), size, omega7, omega8, scales)

    @torch.inference_mode()
    def variant_maps(
        self, image: torch.Tensor, variants: Sequence[str], smoothing_sigma: float = 0.0
    ) -> dict[str, torch.Tensor]:
        """The (B, H, W) maps of several variants (fusion.VARIANTS) at the input's resolution,
        from ONE forward pass."""
        size = tuple(image.shape[-2:])
        raw, omega7, omega8 = self.raw_maps(image, variants)
        return {
            v: gaussian_blur(self._fuse(v, raw, size, omega7, omega8), smoothing_sigma)
            for v in variants
        }

    @torch.inference_mode()
    def infer(
        self,
        image: torch.Tensor,
        variant: str = "full",
        smoothing_sigma: float = 0.0,
        intermediate: bool = False,
    ) -> Inference:
        """ONE forward pass -> the variant's final map, the image scores and, on request, the
        intermediate maps (Omega^1..6, Omega^7 and Omega^8 where the variant uses them)."""
        size = tuple(image.shape[-2:])
        raw, omega7, omega8 = self.raw_maps(image, [variant])
        final = gaussian_blur(self._fuse(variant, raw, size, omega7, omega8), smoothing_sigma)
        return Inference(
            final,
            final.flatten(1).amax(dim=1),
            raw if intermediate else None,
            omega7 if intermediate else None,
            omega8 if intermediate else None,
        )

    def anomaly_map(
        self, image: torch.Tensor, variant: str = "full", smoothing_sigma: float = 0.0
    ) -> torch.Tensor:
        """The (B, H, W) anomaly map of one variant at the input's resolution."""
        return self.variant_maps(image, [variant], smoothing_sigma)[variant]
