"""The machine's peak multiply-add rate (fp32 and bf16), estimated from what the CPU reports, with a measured cross-check.

peak GMAC/s = cores x FMA lanes per cycle per core x clock (GHz)

- cores: the CPUs this process may run on (`os.sched_getaffinity`), capped by the threads the caller uses;
- FMA lanes per cycle per core = FMA units x lanes per unit: the vector width comes from the CPU's flags
  (AVX-512: 16 fp32 lanes, AVX2: 8, else SSE/NEON: 4), the number of FMA units and their width from a small table
  by vendor and family (documented per row below; an unknown CPU is assumed to have 2 units of its vector width);
- clock: `cpuinfo_max_freq` from sysfs when the kernel exposes it, else the `cpu MHz` of /proc/cpuinfo (in a VM
  usually the nominal clock: turbo is not counted).
- bf16: x2 of fp32 where the CPU multiplies bf16 pairs natively (AVX512_BF16 `vdpbf16ps`: two products per fp32
  lane), else the fp32 figure (bf16 is converted and computed in fp32). AMX tiles are not estimated (noted).

`measure=True` adds a cross-check: a 1024 x 1024 fp32 matmul (PyTorch's tuned GEMM, a known-dense kernel) timed on one
thread and on the caller's threads; its rate divided by the estimate says how much of the estimate is reachable.
"""
from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lmrc.utils.device import cpu_flags, cpu_info


@dataclass
class Peak:
    cores: int
    vector_bits: int
    fp32_lanes_per_cycle: int  # per core: FMA units x fp32 lanes each
    clock_ghz: float
    bf16_factor: int
    how: dict[str, str] = field(default_factory=dict)  # quantity: how it was obtained
    matmul_gmacs: dict[int, float] = field(default_factory=dict)  # threads: measured GMAC/s (wall clock)
    matmul_gmacs_cpu_time: float | None = None  # one thread, per second of its own CPU time (load-independent)

    @property
    def fp32_gmacs(self) -> float:
        return self.cores * self.fp32_lanes_per_cycle * self.clock_ghz

    @property
    def bf16_gmacs(self) -> float:
        return self.fp32_gmacs * self.bf16_factor

    def per_core_fp32(self) -> float:
        return self.fp32_lanes_per_cycle * self.clock_ghz

    def fraction(self, gmacs: float, precision: str = "fp32") -> float:
        """gmacs / peak of that precision."""
        return gmacs / (self.bf16_gmacs if precision == "bf16" else self.fp32_gmacs)

    def describe(self) -> list[str]:
        lines = [
            f"peak fp32 {self.fp32_gmacs:.1f} GMAC/s = {self.cores} cores x {self.fp32_lanes_per_cycle} fp32 FMA lanes "
            f"per cycle x {self.clock_ghz:.2f} GHz; bf16 {self.bf16_gmacs:.1f} GMAC/s (x{self.bf16_factor})",
        ]
        lines += [f"  {name}: {how}" for name, how in self.how.items()]
        for threads, gmacs in sorted(self.matmul_gmacs.items()):
            est = self.per_core_fp32() * min(threads, self.cores)
            lines.append(f"  measured: fp32 1024^3 matmul on {threads} thread(s) {gmacs:.1f} GMAC/s = "
                         f"{gmacs / est:.0%} of the estimate for {min(threads, self.cores)} core(s)")
        if self.matmul_gmacs_cpu_time:
            lines.append(f"  measured: the same on 1 thread per second of its CPU time {self.matmul_gmacs_cpu_time:.1f} "
                         f"GMAC/s = {self.matmul_gmacs_cpu_time / self.per_core_fp32():.0%} of one core's estimate "
                         f"(other processes' share of the CPU left out); load average {os.getloadavg()[0]:.1f}")
        return lines


def fma_units(vendor: str, family: int, model: int, vector_bits: int) -> tuple[int, int, str]:
    """(FMA units per core, fp32 lanes per unit, why): a table of what the vendors document per core."""
    if vendor == "AuthenticAMD":
        if family == 0x1A:
            return 2, vector_bits // 32, "AMD Zen 5 (family 1Ah): 2 FMA pipes of the full vector width (table)"
        if family == 0x19 and vector_bits >= 512:
            return 2, 8, ("AMD Zen 4 (family 19h with AVX-512): 2 FMA pipes of 256 bits, 512-bit ops take two "
                          "passes (table)")
        if family in (0x17, 0x19):
            return 2, 8, "AMD Zen 1-3 (family 17h/19h): 2 FMA pipes of 256 bits (table; Zen 1 issues 256-bit as 2x128)"
    if vendor == "GenuineIntel":
        if vector_bits >= 512:
            return 2, 16, ("Intel with AVX-512: assumed 2 FMA units of 512 bits (Xeon Gold/Platinum; some parts "
                           "have 1) (table)")
        if vector_bits >= 256:
            return 2, 8, "Intel with AVX2 (Haswell and later): 2 FMA units of 256 bits (table)"
    return 2, max(vector_bits // 32, 1), f"unknown CPU ({vendor or platform.machine()}): assumed 2 FMA units of the vector width"


def _clock_ghz(info: dict[str, str]) -> tuple[float, str]:
    sysfs = Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")
    try:
        return int(sysfs.read_text()) / 1e6, f"{sysfs} (maximum clock)"
    except (OSError, ValueError):
        pass
    if "cpu MHz" in info:
        return float(info["cpu MHz"]) / 1e3, "/proc/cpuinfo `cpu MHz` (no cpufreq in sysfs: nominal clock, turbo not counted)"
    return 2.0, "unknown: assumed 2.0 GHz"


def matmul_gmacs(threads: int, size: int = 1024, repeats: int = 7, clock=time.perf_counter) -> float:
    """Best-of-`repeats` fp32 matmul rate on `threads` threads (GMAC/s; `clock`: wall clock, or time.thread_time
    for the CPU time of this thread, meaningful with threads=1)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(size, size), torch.randn(size, size)
        for _ in range(2):
            a @ b
        best = float("inf")
        for _ in range(repeats):
            start = clock()
            a @ b
            best = min(best, clock() - start)
    finally:
        torch.set_num_threads(saved)
    return size ** 3 / best / 1e9


def estimate_peak(threads: int | None = None, measure: bool = True) -> Peak:
    """The peak for `threads` cores (default torch.get_num_threads(), capped by the CPUs this process may use)."""
    info = cpu_info()
    try:
        available = len(os.sched_getaffinity(0))
        cores_how = f"{available} CPUs in os.sched_getaffinity"
    except AttributeError:
        available = os.cpu_count() or 1
        cores_how = f"{available} from os.cpu_count()"
    threads = threads or torch.get_num_threads()
    cores = max(1, min(threads, available))
    cores_how += f", {threads} thread(s) used -> {cores}"
    flags = cpu_flags()
    if "avx512f" in flags:
        bits, bits_how = 512, "AVX-512 (avx512f in the CPU flags)"
    elif "avx2" in flags and "fma" in flags:
        bits, bits_how = 256, "AVX2 + FMA (CPU flags)"
    else:
        bits, bits_how = 128, "no AVX2/AVX-512 in the CPU flags: 128-bit vectors assumed"
    vendor = info.get("vendor_id", "")
    try:
        family, model = int(info.get("cpu family", "0")), int(info.get("model", "0"))
    except ValueError:
        family = model = 0
    units, lanes, units_how = fma_units(vendor, family, model, bits)
    clock, clock_how = _clock_ghz(info)
    bf16 = 2 if "avx512_bf16" in flags else 1
    bf16_how = ("avx512_bf16 in the CPU flags: vdpbf16ps does 2 bf16 products per fp32 lane" if bf16 == 2 else
                "no native bf16 dot product: bf16 computes at the fp32 rate")
    if "amx_bf16" in flags:
        bf16_how += "; AMX tiles present but not counted"
    peak = Peak(cores=cores, vector_bits=bits, fp32_lanes_per_cycle=units * lanes, clock_ghz=clock, bf16_factor=bf16,
                how={"CPU": f"{info.get('model name', platform.processor() or platform.machine())} "
                            f"(vendor {vendor or '?'}, family {family:#x}, model {model:#x})",
                     "cores": cores_how, "vector width": bits_how,
                     "FMA units": f"{units} x {lanes} fp32 lanes: {units_how}",
                     "clock": f"{clock:.3f} GHz from {clock_how}", "bf16": bf16_how})
    if measure:
        for n in sorted({1, cores}):
            peak.matmul_gmacs[n] = matmul_gmacs(n)
        peak.matmul_gmacs_cpu_time = matmul_gmacs(1, clock=time.thread_time)
    return peak


if __name__ == "__main__":
    print("\n".join(estimate_peak().describe()))
