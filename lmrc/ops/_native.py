"""Build the native kernels (`local_window.c`, `top_k.c`, `layout.c`, `mask_conv.c`, `aggregate.c`) with the system C
compiler at first use and load them with ctypes.

One library is built per instruction set ("ISA variant") with fixed -m flags, never -march=native, so a cache
shared by machines with different CPUs stays valid; the variant is chosen at load time from the CPU's features
(`cpu_features`): `avx512` (AVX-512 F/BW/VL/DQ; `avx512_256` for rows narrower than NARROW_ROW = 32 px, the same
instructions on 8-float vectors), `avx2` (AVX2 + FMA) or `generic`
(the architecture's baseline, e.g. SSE2 on x86-64: 16-byte vectors). `LMRC_LOCAL_WINDOW_ISA=<variant>` forces one
(an error if this CPU cannot run it).

The shared library is cached per user in `$LMRC_CACHE_DIR` (default `~/.cache/lmrc`) under a name keyed by
the source, the compiler and its flags. It is compiled into a temporary file and renamed into place, so
concurrent processes never load a half-written library.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

from lmrc.utils.device import cpu_flags as cpu_features  # the instruction sets the variants need

SOURCES = tuple(Path(__file__).with_name(name) for name in ("local_window.c", "top_k.c", "layout.c", "mask_conv.c",
                                                                 "aggregate.c"))  # one library
HEADERS = tuple(Path(__file__).with_name(name) for name in ("kernels.h", "local_window_inf.h"))  # in the cache key

# Tried in order: the first set is the intended build, the second keeps a working (single-threaded) kernel when the
# compiler has no OpenMP (e.g. Apple clang).
_FLAG_SETS = (["-O3", "-fopenmp"], ["-O3"])

_X86_AVX512 = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c",
               "-mprefer-vector-width=512"]
# variant: (compiler flags, vector bytes, CPU features it needs (/proc/cpuinfo names)); best first
ISA_VARIANTS = {
    "avx512": (_X86_AVX512, 64, ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx2", "fma")),
    # AVX-512 instructions (32 registers, masks) on 8-float vectors: for rows too narrow for 16-float blocks
    "avx512_256": (_X86_AVX512[:-1], 32, ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx2", "fma")),
    "avx2": (["-mavx2", "-mfma", "-mf16c"], 32, ("avx2", "fma")),
    "generic": ([], 16, ()),
}
_COMMON_FLAGS = ["-std=gnu11", "-shared", "-fPIC"]
_REALS = {torch.float32: ("float", "_f32"), torch.float64: ("double", "_f64")}

_P, _L, _D, _I = ctypes.c_void_p, ctypes.c_long, ctypes.c_double, ctypes.c_int
_SIGNATURES = {
    "lw_similarity_fwd": [_P, _P, _P] + [_L] * 6 + [_D, _I],
    "lw_similarity_bwd": [_P] * 5 + [_L] * 6 + [_D, _I],
    "lw_wsum_fwd": [_P] * 3 + [_L] * 6 + [_I],
    "lw_wsum_bwd": [_P] * 5 + [_L] * 6 + [_I],
    "lw_attention_fwd": [_P] * 6 + [_L] * 7 + [_D, _I],
    "lw_attention_bwd": [_P] * 11 + [_L] * 7 + [_D, _I],
    "lw_attention_inf": [_P] * 6 + [_L] * 8 + [_D] + [_L] * 4 + [_I] + [_L] * 4 + [_I, _P, _I] + [_P] * 2
                        + [_D, _D, _P, _I],
    "lw_wsum_inf": [_P] * 3 + [_L] + [_P] * 2 + [_L] * 5 + [_I] + [_L] * 10 + [_I],
    "tk_rows": [_P] + [_L] * 3 + [_P, _P, _I],
    "ly_nhwc_to_nchw_bf16": [_P] * 3 + [_L] * 4 + [_I],
    "ly_nhwc_to_nchw_f32": [_P] * 3 + [_L] * 4 + [_I],
    "ly_nhwc_bf16_to_nchw_f32": [_P] * 3 + [_L] * 4 + [_I],
    "ly_add_nchw_groups_to_nhwc_f32": [_P] * 3 + [_L] * 4 + [_I, _I],
    "mc_mask_stem": [_P] * 5 + [_L] * 5 + [_I, _I],
    "ag_upsample4_aggregate": [_P] * 4 + [_L] * 4 + [_I],
}
# float build only: the inference kernels reading bfloat16 inputs (same arguments)
_BF16_SIGNATURES = {"lw_attention_inf_bf16": _SIGNATURES["lw_attention_inf"],
                    "lw_wsum_inf_bf16": _SIGNATURES["lw_wsum_inf"], "tk_rows_bf16": _SIGNATURES["tk_rows"]}
# the float AVX-512 build on x86-64 Linux with GCC >= 11 only: the global read's product and top-k on AMX tiles (it
# returns 0, or -1 when Linux refuses the tile state)
_AMX_SIGNATURES = {"tk_matmul_amx": [_P, _L, _L, _P, _P, _L, _L, _P, _P, _I]}

_lock = threading.Lock()
_loaded: dict[tuple[torch.dtype, str], "NativeLibrary | None"] = {}
_warned = False


_mac_counts: dict[str, float] | None = None  # multiply-adds by kind while count_multiply_adds() is active


@contextmanager
def count_multiply_adds():
    """Count the nominal multiply-adds of the native kernels called in the block, whichever path runs them (the
    kernels run outside PyTorch, so its FLOP counter does not see them): yields a dict by kind, "local_window" (the
    local reads, `lmrc.ops.local_window`), "convolution" (`lmrc.ops.mask_conv`) and "matrix_product" (the global
    read's product on AMX tiles, `lmrc.ops.top_k.matmul_top_k`), each a running count."""
    global _mac_counts
    previous, counts = _mac_counts, {"local_window": 0.0, "convolution": 0.0, "matrix_product": 0.0}
    _mac_counts = counts
    try:
        yield counts
    finally:
        _mac_counts = previous


def count_macs(kind: str, macs: float) -> None:
    """Add `macs` multiply-adds of `kind` to the active count_multiply_adds() block, if any."""
    if _mac_counts is not None:
        _mac_counts[kind] += float(macs)


def supported_isas() -> list[str]:
    """The ISA variants this CPU can run, best first."""
    x86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "i386")
    features = cpu_features()
    return [name for name, (_, _, needs) in ISA_VARIANTS.items()
            if name == "generic" or (x86 and all(f in features for f in needs))]


def chosen_isa() -> str:
    """The variant to load: `LMRC_LOCAL_WINDOW_ISA` if set (an error if the CPU lacks it), else the best supported."""
    forced = os.environ.get("LMRC_LOCAL_WINDOW_ISA", "").strip().lower()
    supported = supported_isas()
    if not forced or forced == "auto":
        return supported[0]
    if forced not in ISA_VARIANTS:
        raise ValueError(f"LMRC_LOCAL_WINDOW_ISA must be auto or one of {', '.join(ISA_VARIANTS)}, got {forced!r}")
    if forced not in supported:
        raise RuntimeError(f"LMRC_LOCAL_WINDOW_ISA={forced}: this CPU lacks "
                           f"{', '.join(f for f in ISA_VARIANTS[forced][2] if f not in cpu_features())}; "
                           f"it can run {', '.join(supported)}")
    return forced


class NativeLibrary:
    """The compiled kernels of one ISA variant for one floating type (float32 or float64)."""

    def __init__(self, path: Path, suffix: str, flags: list[str], isa: str = "generic"):
        self.path = path
        self.flags = flags
        self.isa = isa
        self.vector_bytes = ISA_VARIANTS[isa][1] if isa in ISA_VARIANTS else None  # None: built elsewhere
        self.openmp = "-fopenmp" in flags
        lib = ctypes.CDLL(str(path))
        self._functions = {}
        signatures = {**_SIGNATURES, **(_BF16_SIGNATURES if hasattr(lib, "lw_attention_inf_bf16" + suffix) else {})}
        self.bf16_inputs = len(signatures) > len(_SIGNATURES)
        self.amx = hasattr(lib, "tk_matmul_amx" + suffix)  # built with the AMX kernel (the CPU may still lack AMX)
        if self.amx:
            signatures.update(_AMX_SIGNATURES)
        for name, argtypes in signatures.items():
            fn = getattr(lib, name + suffix)
            fn.argtypes = argtypes
            fn.restype = ctypes.c_int if name in _AMX_SIGNATURES else None
            self._functions[name] = fn
        self._lib = lib

    def __call__(self, name: str, *args):
        # ctypes.CDLL releases the GIL during the call; the kernel's OpenMP team uses torch's thread count.
        return self._functions[name](*args, torch.get_num_threads())


def cache_dir() -> Path:
    return Path(os.environ.get("LMRC_CACHE_DIR") or Path.home() / ".cache" / "lmrc")


def _compiler() -> list[str] | None:
    cc = shlex.split(os.environ.get("CC", "cc"))
    if not cc or shutil.which(cc[0]) is None:
        return None
    return cc


def _compiler_version(cc: list[str]) -> str:
    try:
        return subprocess.run(cc + ["--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def _build(cc: list[str], real: str, suffix: str, isa: str) -> tuple[Path | None, list[str], str]:
    """Returns (library path or None, flags used, compiler error text)."""
    isa_flags, vector_bytes, _ = ISA_VARIANTS[isa]
    source = b"\0".join(path.read_bytes() for path in SOURCES + HEADERS)
    version = _compiler_version(cc)
    errors = ""
    out_dir = cache_dir()
    for flags in _FLAG_SETS:
        full = _COMMON_FLAGS + flags + isa_flags + [f"-DLW_REAL={real}", f"-DLW_SUFFIX={suffix}",
                                                    f"-DLW_VBYTES={vector_bytes}"]
        if real == "float":
            full.append("-DLW_BF16_INPUTS=1")
        key = hashlib.sha256(
            b"\0".join([source, " ".join(cc).encode(), version.encode(), " ".join(full).encode(),
                        platform.machine().encode()])
        ).hexdigest()[:20]
        target = out_dir / f"local_window{suffix}_{isa}_{key}.so"
        if target.exists():
            return target, flags, ""
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=target.stem + ".", suffix=".tmp")
            os.close(fd)
        except OSError as exc:
            return None, flags, f"cannot write to the cache directory {out_dir}: {exc}"
        try:
            proc = subprocess.run(
                cc + full + [str(path) for path in SOURCES] + ["-o", tmp, "-lm"], capture_output=True, text=True,
                timeout=300
            )
            if proc.returncode == 0:
                os.replace(tmp, target)  # atomic: a concurrent builder of the same key writes identical bytes
                return target, flags, ""
            errors = proc.stderr.strip()
        except (OSError, subprocess.SubprocessError) as exc:
            errors = str(exc)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return None, [], errors


def _warn_once(message: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def load(dtype: torch.dtype, isa: str | None = None) -> NativeLibrary | None:
    """The native kernels for `dtype` (float32 or float64) in ISA variant `isa` (default `chosen_isa()`), or None
    (warned once) when they cannot be built. A variant the compiler rejects falls back to the next one."""
    isa = isa or chosen_isa()
    if (dtype, isa) in _loaded:
        return _loaded[(dtype, isa)]
    with _lock:
        if (dtype, isa) in _loaded:
            return _loaded[(dtype, isa)]
        real, suffix = _REALS[dtype]
        lib = None
        cc = _compiler()
        if cc is None:
            _warn_once(
                "lmrc: no C compiler found (looked for $CC or `cc`); the local-window ops (LMR/SLMR) fall back to "
                "plain PyTorch, which is several times slower and uses more memory. Install gcc to get the fast path."
            )
        else:
            names = list(ISA_VARIANTS)
            for built_isa in names[names.index(isa):]:  # this variant, else the next simpler one
                path, flags, errors = _build(cc, real, suffix, built_isa)
                if path is not None:
                    break
            if path is None:
                _warn_once(
                    f"lmrc: compiling {', '.join(source.name for source in SOURCES)} with `{' '.join(cc)}` failed; "
                    f"the local-window ops (LMR/SLMR) and the global read's top-k fall back to plain PyTorch "
                    f"(slower, more memory). Compiler said:\n{errors[-2000:]}"
                )
            else:
                try:
                    lib = NativeLibrary(path, suffix, flags, built_isa)
                except (OSError, AttributeError) as exc:
                    _warn_once(f"lmrc: cannot load {path}: {exc}; local-window ops fall back to plain PyTorch.")
                if lib is not None and not lib.openmp:
                    _warn_once("lmrc: the C compiler has no OpenMP; local-window kernels run on one thread.")
        _loaded[(dtype, isa)] = lib
        return lib


# Below this row width 16-float blocks are 1 or 2 per row, all border blocks: no faster than 8-float ones at 24 px.
# From 40 px on they are as fast or faster (`benchmarks/narrow_rows.py`, 2 threads, LMR inference and
# forward + backward, 8- / 16-float: 24 px 0.261 / 0.261 and 0.810 / 0.815 ms; 40 px 1.927 / 1.766 forward +
# backward; 54 px (1/16 of 480p) 0.550 / 0.495 and 2.013 / 1.869).
NARROW_ROW = 32


def load_for_width(dtype: torch.dtype, width: int) -> NativeLibrary | None:
    """`load(dtype)`, except that rows narrower than NARROW_ROW take `avx512_256` where `avx512` was chosen
    automatically (a variant forced by LMRC_LOCAL_WINDOW_ISA is kept)."""
    isa = chosen_isa()
    forced = os.environ.get("LMRC_LOCAL_WINDOW_ISA", "").strip().lower() not in ("", "auto")
    if width < NARROW_ROW and isa == "avx512" and not forced:
        return load(dtype, "avx512_256")
    return load(dtype, isa)


def reset() -> None:
    """Forget loaded libraries and the warning state (tests use it to exercise the build and fallback paths)."""
    global _warned
    with _lock:
        _loaded.clear()
        _warned = False
