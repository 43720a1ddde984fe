"""Where and in what precision inference runs: chosen once, here, for every command and the library.

`--precision auto` (the default) picks bf16 where the hardware computes it natively (a CPU with AVX512_BF16 or
AMX-BF16 that PyTorch runs its AVX-512 kernels on, or a CUDA GPU with bf16 support) and fp32 elsewhere: without
native units a CPU converts every operand, and bf16 measured 20-70x slower than fp32 on an AVX2 CPU
(docs/PERFORMANCE.md). The choice comes with the reason, for the report.
"""
from __future__ import annotations

import functools
import platform
import subprocess
from dataclasses import dataclass

import torch

from lmrc.utils.errors import LmrcError

# precision name -> autocast dtype (None: no autocast)
AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
PRECISIONS = ("auto", *AUTOCAST_DTYPES)


def choose_device(name: str | torch.device | None = "auto") -> torch.device:
    """'auto' (or None) | 'cpu' | 'cuda[:N]' -> a usable device, or LmrcError saying why not."""
    if isinstance(name, torch.device):
        return name
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "built without CUDA"
        raise LmrcError(f"--device cuda: PyTorch ({build}) sees no CUDA GPU on this machine; use --device cpu (or auto)")
    try:
        return torch.device(name)
    except RuntimeError:
        raise LmrcError(f"--device {name!r} is not a device; use auto, cpu or cuda") from None


@functools.cache
def cpu_info() -> dict[str, str]:
    """The first CPU's fields in /proc/cpuinfo (`model name`, `vendor_id`, `cpu family`, `model`, `cpu MHz`,
    `flags` or Arm's `Features`, ...), read once per process; empty where there is no /proc/cpuinfo."""
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the first CPU is enough
                key, _, value = line.partition(":")
                info[key.strip()] = value.strip()
    except OSError:
        pass
    return info


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux names them (`avx2`, `fma`, `avx512f`, `avx512_bf16`, `amx_bf16`, ...), read once
    per process (every native kernel call picks its library through them).

    Linux: the `flags` (x86) or `Features` (Arm) line of /proc/cpuinfo; the kernel leaves out what the OS does not
    enable, e.g. AVX-512 state it does not save. An x86 Mac: the `sysctl` feature lists, lower-cased. Elsewhere
    what PyTorch reports about bf16 and AMX.
    """
    info = cpu_info()
    if "flags" in info or "Features" in info:
        return frozenset(info.get("flags", info.get("Features", "")).split())
    if platform.system() == "Darwin" and platform.machine() == "x86_64":
        try:
            out = subprocess.run(["sysctl", "-n", "machdep.cpu.features", "machdep.cpu.leaf7_features"],
                                 capture_output=True, text=True, timeout=10).stdout.lower().split()
            names = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq")
            return frozenset(name for name in (x.replace(".", "") for x in out) if name in names)
        except (OSError, subprocess.SubprocessError):
            pass
    flags = set()
    if getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)():
        flags.add("avx512_bf16")
    if getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)():
        flags.add("amx_bf16")
    return frozenset(flags)


def native_cpu_precision(precision: str, flags: set[str] | None = None, capability: str | None = None) -> str | None:
    """The CPU feature that computes `precision` (bf16 / fp16) natively here, or None. PyTorch uses those units
    only from its AVX-512 kernels, so its dispatch level (`capability`, e.g. "AVX2", "AVX512") counts too."""
    flags = cpu_flags() if flags is None else flags
    capability = torch.backends.cpu.get_cpu_capability() if capability is None else capability
    if "AVX512" not in capability.upper():
        return None
    wanted = {"bf16": ("amx_bf16", "avx512_bf16"), "fp16": ("amx_fp16", "avx512_fp16")}.get(precision, ())
    return next((flag.upper() for flag in wanted if flag in flags), None)


@dataclass(frozen=True)
class PrecisionChoice:
    """The precision inference runs in ("fp32", "bf16", "fp16") and why."""

    name: str
    reason: str

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return AUTOCAST_DTYPES[self.name]


def choose_precision(requested: str, device: torch.device | str, *, flags: set[str] | None = None,
                     capability: str | None = None) -> PrecisionChoice:
    """'auto' | 'fp32' | 'bf16' | 'fp16' on `device` -> PrecisionChoice; a precision the device cannot run is an
    LmrcError. flags / capability: the CPU's (default: this machine's), for tests."""
    device = torch.device(device)
    if requested not in PRECISIONS:
        raise LmrcError(f"precision must be one of {', '.join(PRECISIONS)}, got {requested!r}")
    if device.type == "cuda":
        if requested == "bf16" and not torch.cuda.is_bf16_supported():
            raise LmrcError("--precision bf16: this GPU has no bfloat16 support; use --precision fp16 or fp32")
        if requested != "auto":
            return PrecisionChoice(requested, "as asked")
        if torch.cuda.is_bf16_supported():
            return PrecisionChoice("bf16", f"auto: {torch.cuda.get_device_name(device)} supports bf16")
        return PrecisionChoice("fp32", f"auto: {torch.cuda.get_device_name(device)} has no bf16 support")
    if requested != "auto":
        return PrecisionChoice(requested, "as asked")
    if device.type != "cpu":
        return PrecisionChoice("fp32", f"auto: fp32 on {device.type}")
    capability = torch.backends.cpu.get_cpu_capability() if capability is None else capability
    native = native_cpu_precision("bf16", flags, capability)
    if native:
        return PrecisionChoice("bf16", f"auto: the CPU has native bf16 ({native})")
    return PrecisionChoice("fp32", f"auto: the CPU has no native bf16 (PyTorch runs its {capability} kernels; "
                                   "AVX512_BF16 or AMX needed)")


def half_precision_warning(precision: str, flags: set[str] | None = None, capability: str | None = None) -> str | None:
    """Why `precision` will be slow on this CPU, or None (see the module docstring)."""
    if precision in ("fp32", "auto"):
        return None
    capability = torch.backends.cpu.get_cpu_capability() if capability is None else capability
    if native_cpu_precision(precision, flags, capability):
        return None
    return (f"--precision {precision} on this CPU ({capability}, no native 16-bit float math) is slower than fp32; "
            "use fp32 (or auto) here")
