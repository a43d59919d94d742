"""`--precision auto`: bf16 + channels-last with native bf16, the exact fp32 path elsewhere."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rstpm.cli import _config_from_args, build_parser
from rstpm.config import DEFAULT_POOL_REFRESH, Config
from rstpm.core.precision import choose_precision
from rstpm.hardware import CPU_FLAGS_ENV, cpu_flags, parse_cpuinfo_flags, torch_threads
from rstpm.runs.run_dir import load_run, load_weights
from rstpm.training.fit import fit

X86 = """processor\t: 0
vendor_id\t: GenuineIntel
flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile
processor\t: 1
flags\t\t: fpu sse2
"""
ZEN3 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n"
ARM = "processor\t: 0\nFeatures\t: fp asimd bf16\n"


def test_torch_threads_restores_the_count_also_after_an_error() -> None:
    before = torch.get_num_threads()
    target = 1 if before != 1 else 2
    with torch_threads(target):
        assert torch.get_num_threads() == target
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), torch_threads(target):
        raise RuntimeError("inside")
    assert torch.get_num_threads() == before


def test_cpuinfo_flags_of_the_first_processor() -> None:
    assert {"avx512_bf16", "amx_bf16"} <= parse_cpuinfo_flags(X86)
    assert "avx512_bf16" not in parse_cpuinfo_flags(ZEN3)
    assert parse_cpuinfo_flags(ARM) == {"fp", "asimd", "bf16"}
    assert parse_cpuinfo_flags("no flags here") == frozenset()


@pytest.mark.parametrize(
    ("flags", "precision", "channels_last"),
    [
        ({"avx512_bf16"}, "bf16", True),
        ({"amx_bf16"}, "bf16", True),
        ({"avx2", "avx512f"}, "fp32", True),  # AVX-512 without its BF16 extension
        (set(), "fp32", True),
        ({"bf16"}, "fp32", True),  # ARM's bf16: not measured here, so fp32
    ],
)
def test_auto_takes_bf16_only_with_native_bf16(flags, precision, channels_last) -> None:
    choice = choose_precision("auto", flags)
    assert (choice.precision, choice.channels_last) == (precision, channels_last)
    assert choice.requested == "auto"


def test_an_explicit_precision_is_kept_whatever_the_cpu() -> None:
    assert choose_precision("fp32", {"amx_bf16"}).precision == "fp32"
    assert not choose_precision("fp32", {"amx_bf16"}).channels_last
    assert choose_precision("bf16", set()).precision == "bf16"
    assert choose_precision("auto", set(), channels_last=True).channels_last
    with pytest.raises(ValueError, match="auto, fp32, bf16"):
        choose_precision("fp16", set())


def test_the_environment_overrides_the_detected_flags(monkeypatch) -> None:
    monkeypatch.setenv(CPU_FLAGS_ENV, "avx2, avx512_bf16")
    assert cpu_flags() == {"avx2", "avx512_bf16"}
    monkeypatch.setenv(CPU_FLAGS_ENV, "none")
    assert cpu_flags() == frozenset()


CONFIG = dict(image_size=64, epochs=1, batch_size=8, disc_epochs=1, disc_batch_size=8)


@pytest.fixture(scope="module")
def fp32_run(synthetic_category: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("precision") / "fp32"
    fit(Config(precision="fp32", **CONFIG), synthetic_category, out, progress=False)
    return out


def test_the_pool_refresh_default_follows_the_precision() -> None:
    assert DEFAULT_POOL_REFRESH > 1
    assert Config().disc_pool_refresh == DEFAULT_POOL_REFRESH
    assert Config(precision="bf16").disc_pool_refresh == DEFAULT_POOL_REFRESH
    assert Config(precision="fp32").disc_pool_refresh == 1  # the exact path, as the paper
    assert Config(precision="fp32", disc_pool_refresh=3).disc_pool_refresh == 3
    stored = Config(disc_pool_refresh=1).to_dict()  # a run's config.json keeps its number
    assert stored["disc_pool_refresh"] == 1 and Config.from_dict(stored).disc_pool_refresh == 1
    parser = build_parser()
    for argv, expected in [
        ([], DEFAULT_POOL_REFRESH),
        (["--precision", "fp32"], 1),
        (["--precision", "fp32", "--disc-pool-refresh", "2"], 2),
    ]:
        args = parser.parse_args(["fit", "--data", "d", "--out", "o", *argv])
        assert _config_from_args(args).disc_pool_refresh == expected, argv


def test_auto_without_native_bf16_trains_fp32_channels_last_bit_for_bit(
    fp32_run: Path, synthetic_category: Path, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv(CPU_FLAGS_ENV, "avx2")
    config = Config(**CONFIG, disc_pool_refresh=1)  # the pool refresh is compared elsewhere
    fit(config, synthetic_category, tmp_path / "auto", progress=False)
    info = json.loads((tmp_path / "auto" / "run.json").read_text())
    assert info["precision"] == {
        "requested": "auto",
        "precision": "fp32",
        "channels_last": True,
        "native_bf16": False,
    }
    explicit = Config(**CONFIG, precision="fp32", channels_last=True)
    fit(explicit, synthetic_category, tmp_path / "fp32-cl", progress=False)
    actual = load_weights(tmp_path / "auto" / "weights.safetensors")
    same = load_weights(tmp_path / "fp32-cl" / "weights.safetensors")
    exact = load_weights(fp32_run / "weights.safetensors")
    assert same.keys() == actual.keys() == exact.keys()
    assert all(torch.equal(same[k], actual[k]) for k in same)  # auto is fp32 + channels-last
    # ... which is not the exact path: fp32 arithmetic in another order (the early SGD steps of
    # random students amplify it as they amplify a change of the thread count)
    assert not all(torch.equal(exact[k], actual[k]) for k in exact)


def test_auto_with_native_bf16_trains_bf16_channels_last_and_resolves_again_on_load(
    synthetic_category: Path, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv(CPU_FLAGS_ENV, "avx512_bf16")
    config = Config(**{**CONFIG, "disc_epochs": 0})
    fit(config, synthetic_category, tmp_path / "auto", progress=False)
    info = json.loads((tmp_path / "auto" / "run.json").read_text())
    assert info["precision"]["precision"] == "bf16" and info["precision"]["channels_last"]
    model, config, _ = load_run(tmp_path / "auto")
    assert config.precision == "auto" and model.precision == "bf16"
    monkeypatch.setenv(CPU_FLAGS_ENV, "none")  # the same run on a CPU without native bf16
    model, _, _ = load_run(tmp_path / "auto")
    assert model.precision == "fp32"
    assert load_run(tmp_path / "auto", precision="bf16")[0].precision == "bf16"
