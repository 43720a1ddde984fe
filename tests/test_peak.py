"""The peak estimate: cores x FMA lanes x clock, each part from what the CPU reports, and its derivation printed."""
from __future__ import annotations

import pytest

from lmrc.eval import peak as peak_module
from lmrc.eval.peak import Peak, estimate_peak, fma_units


@pytest.mark.parametrize("vendor,family,bits,lanes", [
    ("AuthenticAMD", 0x19, 512, 16),   # Zen 4: 2 x 256-bit pipes, AVX-512 double-pumped
    ("AuthenticAMD", 0x19, 256, 16),   # Zen 3
    ("AuthenticAMD", 0x1A, 512, 32),   # Zen 5: 2 x 512
    ("GenuineIntel", 6, 512, 32),
    ("GenuineIntel", 6, 256, 16),
    ("SomethingElse", 1, 128, 8),
])
def test_fma_table(vendor, family, bits, lanes):
    units, per_unit, why = fma_units(vendor, family, 0, bits)
    assert units * per_unit == lanes and why


def test_peak_arithmetic_and_fraction():
    p = Peak(cores=2, vector_bits=512, fp32_lanes_per_cycle=16, clock_ghz=2.5, bf16_factor=2)
    assert p.fp32_gmacs == pytest.approx(80.0) and p.bf16_gmacs == pytest.approx(160.0)
    assert p.fraction(20.0) == pytest.approx(0.25) and p.fraction(20.0, "bf16") == pytest.approx(0.125)
    assert "2 cores x 16 fp32 FMA lanes per cycle x 2.50 GHz" in p.describe()[0]


def test_estimate_says_how_each_number_was_obtained(monkeypatch):
    monkeypatch.setattr(peak_module, "matmul_gmacs", lambda threads, **kw: 10.0 * threads)
    p = estimate_peak(threads=1)
    assert p.cores == 1 and p.clock_ghz > 0 and p.fp32_lanes_per_cycle >= 4
    assert set(p.how) >= {"cores", "vector width", "FMA units", "clock", "bf16"}
    text = "\n".join(p.describe())
    assert "measured: fp32 1024^3 matmul on 1 thread(s) 10.0 GMAC/s" in text
    assert p.fp32_gmacs == pytest.approx(p.cores * p.fp32_lanes_per_cycle * p.clock_ghz)


def test_cpu_flags_name_and_peak_come_from_the_first_cpus_fields():
    """One reader of /proc/cpuinfo (`cpu_info`, cached) behind the flags the kernels choose by, bench's CPU name and
    the peak's vendor and clock."""
    from pathlib import Path

    from lmrc.eval.bench import cpu_description
    from lmrc.utils.device import cpu_flags, cpu_info

    if not Path("/proc/cpuinfo").exists():
        pytest.skip("no /proc/cpuinfo here")
    info = cpu_info()
    listed = info.get("flags", info.get("Features"))
    assert listed is not None and cpu_flags() == frozenset(listed.split())
    if "model name" in info:
        assert cpu_description()["name"] == info["model name"]
        assert info["model name"] in " ".join(estimate_peak(1, measure=False).describe())
