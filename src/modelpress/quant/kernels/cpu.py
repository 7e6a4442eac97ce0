"""What this CPU can run: its instruction set, and which of torch's integer kernels are exact on it.

The native kernels come in five builds, best first: `avx512_vnni`, `avx512`, `avx2_vnni` (AVX-VNNI, e.g. Intel
12th gen and later), `avx2` (e.g. AMD Zen 2/3), `scalar` (portable C++; ARM and everything else). The level used is
the best the CPU has, lowered by

- `ATEN_CPU_CAPABILITY` (torch's own switch): `avx2` runs the plain AVX2 build (no VNNI), as on an AVX2-only CPU;
  `default` the scalar build. CI sets it (with `ONEDNN_MAX_CPU_ISA=AVX2 FBGEMM_ENABLE_INSTRUCTIONS=AVX2`) to run
  the AVX2 code paths on an AVX-512 machine;
- `MODELPRESS_ISA=avx512_vnni|avx512|avx2_vnni|avx2|scalar|none` (`none`: no native kernels at all).

torch's fbgemm (`quantized::linear_dynamic`) and oneDNN (`torch._int_mm`) int8 kernels multiply uint8 by int8 with
`vpmaddubsw` unless the CPU has VNNI: the int16 pair sums saturate and the results are wrong. They are trusted only
where their library runs VNNI (and each is probed once more before use, see `probe.py`).
"""
from __future__ import annotations

import os
import platform
import re
from dataclasses import dataclass
from functools import lru_cache

import torch

ISAS = ("avx512_vnni", "avx512", "avx2_vnni", "avx2", "scalar")
X86_ISAS = ISAS[:-1]  # the builds with x86 vector code (the rest: the portable loops)
_RANK = {name: i for i, name in enumerate(ISAS)}  # lower is better
_ATEN = {"avx512": "avx512_vnni", "avx2": "avx2", "default": "scalar"}  # ATEN_CPU_CAPABILITY -> best allowed


@dataclass(frozen=True)
class CpuInfo:
    arch: str  # platform.machine(): x86_64, aarch64, arm64 ...
    model: str  # the CPU's model name
    hardware: str  # best native build the CPU itself supports ("scalar" when none)
    isa: str  # the build used: `hardware` lowered by ATEN_CPU_CAPABILITY / MODELPRESS_ISA ("none": disabled)
    torch_capability: str  # torch.backends.cpu.get_cpu_capability()
    fbgemm_exact: bool  # quantized::linear_dynamic runs VNNI here (u8 x s8 without saturation)
    onednn_exact: bool  # torch._int_mm runs VNNI/AMX here
    neon: bool = False
    bf16_fast: bool = False  # oneDNN multiplies bf16 in hardware here (AMX-BF16 or AVX512-BF16)

    @property
    def key(self) -> str:
        """What the speed of a kernel depends on: CPU model, build used, torch's level and version, threads."""
        model = re.sub(r"[^A-Za-z0-9]+", "-", self.model).strip("-")[:48] or self.arch
        return (f"{model}-{self.isa}-{self.torch_capability.lower()}"
                f"{'-fbgemm' if self.fbgemm_exact else ''}{'-onednn' if self.onednn_exact else ''}")

    def describe(self) -> str:
        extra = [n for n, ok in (("fbgemm VNNI", self.fbgemm_exact), ("oneDNN VNNI", self.onednn_exact)) if ok]
        lowered = f" (CPU: {self.hardware})" if self.isa != self.hardware else ""
        return f"{self.model}; kernels {self.isa}{lowered}; torch {self.torch_capability}" + (
            f"; {', '.join(extra)}" if extra else "")


def _flags() -> tuple[str, frozenset[str]]:
    model, flags = "", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "Model", "Hardware") and not model:
                    model = value.strip()
                elif key in ("flags", "Features"):
                    flags.update(value.split())
                if key == "" and flags:  # first processor's block is enough
                    break
    except OSError:
        pass
    return model or platform.processor() or platform.machine(), frozenset(flags)


def _hardware(arch: str, flags: frozenset[str]) -> str:
    x86 = arch.lower() in ("x86_64", "amd64")
    if not x86:
        return "scalar"
    if not flags:  # no /proc/cpuinfo (macOS, Windows): trust torch's own detection
        cap = torch.backends.cpu.get_cpu_capability().lower()
        return {"avx512": "avx512", "avx2": "avx2"}.get(cap, "scalar")
    avx2 = {"avx2", "fma"} <= flags
    avx512 = avx2 and {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags
    if avx512:
        return "avx512_vnni" if "avx512_vnni" in flags else "avx512"
    if avx2:
        return "avx2_vnni" if "avx_vnni" in flags else "avx2"
    return "scalar"


def _lowest(*names: str) -> str:
    return max(names, key=lambda n: _RANK[n])


def _env_isa(hardware: str) -> str:
    isa = hardware
    aten = os.environ.get("ATEN_CPU_CAPABILITY", "").strip().lower()
    if aten in _ATEN:
        isa = _lowest(isa, _ATEN[aten])
    want = os.environ.get("MODELPRESS_ISA", "").strip().lower()
    if want == "none":
        return "none"
    if want:
        if want not in _RANK:
            raise ValueError(f"MODELPRESS_ISA={want!r} is not one of {', '.join(ISAS)}, none")
        isa = _lowest(isa, want)
    return isa


def _fbgemm_exact(hw_flags: frozenset[str], isa: str) -> bool:
    limit = os.environ.get("FBGEMM_ENABLE_INSTRUCTIONS", "").strip().upper()
    return isa == "avx512_vnni" and "avx512_vnni" in hw_flags and limit in ("", "AVX512_E1", "AVX512_VNNI")


def _onednn_exact(hw_flags: frozenset[str], isa: str) -> bool:
    limit = os.environ.get("ONEDNN_MAX_CPU_ISA", os.environ.get("DNNL_MAX_CPU_ISA", "")).strip().upper()
    allowed = limit in ("", "ALL", "AVX512_CORE_VNNI", "AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX",
                        "AVX512_CORE_AMX_FP16", "AVX10_1_512", "AVX10_1_512_AMX", "AVX10_1_512_AMX_FP16")
    return isa == "avx512_vnni" and "avx512_vnni" in hw_flags and allowed


@lru_cache(maxsize=None)
def _info(env: tuple) -> CpuInfo:
    arch = platform.machine()
    model, flags = _flags()
    hardware = _hardware(arch, flags)
    isa = _env_isa(hardware)
    return CpuInfo(arch=arch, model=model, hardware=hardware, isa=isa,
                   torch_capability=torch.backends.cpu.get_cpu_capability(),
                   fbgemm_exact=_fbgemm_exact(flags, isa), onednn_exact=_onednn_exact(flags, isa),
                   neon=arch.lower() in ("aarch64", "arm64") or "asimd" in flags,
                   bf16_fast=_onednn_exact(flags, isa) and bool({"amx_bf16", "avx512_bf16"} & flags))


ENV_VARS = ("ATEN_CPU_CAPABILITY", "MODELPRESS_ISA", "FBGEMM_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA",
            "DNNL_MAX_CPU_ISA")


def cpu_info() -> CpuInfo:
    """This CPU as the kernels see it (environment switches included; cached per set of switch values)."""
    return _info(tuple(os.environ.get(k) for k in ENV_VARS))


CACHE_FALLBACK = {2: 1 << 20}  # where neither sysfs nor sysconf says: a common x86 L2 (the guard asks for no other)
SYSFS_CACHE = "/sys/devices/system/cpu/cpu0/cache"


@lru_cache(maxsize=None)
def cache_bytes(level: int) -> int:
    """Bytes of CPU 0's data (or unified) cache at `level` (2: its core's L2): from sysfs (Linux), else sysconf,
    else a common size (0 for levels without one)."""
    size = sysfs_cache_bytes(SYSFS_CACHE, level)
    if not size:
        try:
            size = int(os.sysconf(f"SC_LEVEL{level}_CACHE_SIZE"))
        except (ValueError, OSError, AttributeError):
            size = 0
    return size if size > 0 else CACHE_FALLBACK.get(level, 0)


def sysfs_cache_bytes(root: str, level: int) -> int:
    """The size sysfs gives under `root` (index*/level, type, size such as "2048K"), 0 where it says nothing."""
    try:
        entries = sorted(e for e in os.listdir(root) if e.startswith("index"))
    except OSError:
        return 0
    for entry in entries:
        d = os.path.join(root, entry)
        try:
            with open(os.path.join(d, "level")) as f:
                lvl = int(f.read())
            with open(os.path.join(d, "type")) as f:
                kind = f.read().strip()
            with open(os.path.join(d, "size")) as f:
                size = f.read().strip().upper()
            if lvl != level or kind == "Instruction":
                continue
            unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(size[-1:], 1)
            return int(size.rstrip("KMG")) * unit
        except (OSError, ValueError):
            continue
    return 0
