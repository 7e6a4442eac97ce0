"""CPU detection (flags and environment switches) and the native build's fallback when it cannot be built."""
import warnings

import pytest
import torch
from torch import nn

from modelpress.quant import QuantLinear, kernels
from modelpress.quant.kernels import build, cpu

AVX512 = frozenset({"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq"})


@pytest.mark.parametrize("arch,flags,expected", [
    ("x86_64", AVX512 | {"avx512_vnni"}, "avx512_vnni"),
    ("x86_64", AVX512, "avx512"),
    ("x86_64", frozenset({"avx2", "fma", "avx_vnni"}), "avx2_vnni"),
    ("x86_64", frozenset({"avx2", "fma"}), "avx2"),
    ("x86_64", frozenset({"avx", "sse4_2"}), "scalar"),
    ("x86_64", AVX512 - {"avx512bw"}, "avx2"),  # AVX-512F without BW (Xeon Phi): the AVX2 build
    ("aarch64", frozenset({"asimd", "fp"}), "scalar"),
])
def test_hardware_level(arch, flags, expected):
    assert cpu._hardware(arch, flags) == expected


@pytest.mark.parametrize("env,hardware,expected", [
    ({}, "avx512_vnni", "avx512_vnni"),
    ({"ATEN_CPU_CAPABILITY": "avx2"}, "avx512_vnni", "avx2"),  # plain AVX2, as on an AVX2-only CPU (CI)
    ({"ATEN_CPU_CAPABILITY": "avx2"}, "avx2_vnni", "avx2"),
    ({"ATEN_CPU_CAPABILITY": "default"}, "avx512", "scalar"),
    ({"ATEN_CPU_CAPABILITY": "avx512"}, "avx2", "avx2"),  # a switch never raises the level
    ({"MODELPRESS_ISA": "avx512"}, "avx512_vnni", "avx512"),
    ({"MODELPRESS_ISA": "scalar"}, "avx2", "scalar"),
    ({"MODELPRESS_ISA": "avx512_vnni"}, "avx2", "avx2"),
    ({"MODELPRESS_ISA": "none"}, "avx512_vnni", "none"),
])
def test_environment_lowers_the_level(env, hardware, expected, monkeypatch):
    for k in ("ATEN_CPU_CAPABILITY", "MODELPRESS_ISA"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert cpu._env_isa(hardware) == expected


@pytest.mark.parametrize("env", [{}, {"ATEN_CPU_CAPABILITY": "avx2"}, {"ATEN_CPU_CAPABILITY": "default"},
                                 {"MODELPRESS_ISA": "avx2_vnni"}, {"MODELPRESS_ISA": "scalar"},
                                 {"ATEN_CPU_CAPABILITY": "avx512", "MODELPRESS_ISA": "avx2"}])
def test_the_plain_loops_follow_the_switches(env, monkeypatch):
    """The native plain loops (fake quantization, fp8 rounding, table decoding: csrc common.h MPK_MULTI) run at the
    level of the build the layers run, switches included (they had chosen by the CPU alone, so the AVX2 switches of
    the tests and benchmarks did not reach them)."""
    lib = build.load()
    if lib is None:
        pytest.skip("no native build")
    for k in ("ATEN_CPU_CAPABILITY", "MODELPRESS_ISA"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    isa = cpu._env_isa(cpu.cpu_info().hardware)
    assert lib.loop_level() == (2 if isa.startswith("avx512") else 1 if isa.startswith("avx2") else 0)


def test_bad_isa_switch_is_named(monkeypatch):
    monkeypatch.setenv("MODELPRESS_ISA", "avx1024")
    with pytest.raises(ValueError, match="MODELPRESS_ISA='avx1024'"):
        cpu._env_isa("avx2")


@pytest.mark.parametrize("env,isa,fbgemm,onednn", [
    ({}, "avx512_vnni", True, True),
    ({}, "avx512", False, False),  # Skylake-X: vpmaddubsw saturates
    ({}, "avx2", False, False),
    ({"FBGEMM_ENABLE_INSTRUCTIONS": "AVX2"}, "avx512_vnni", False, True),
    ({"ONEDNN_MAX_CPU_ISA": "AVX2"}, "avx512_vnni", True, False),
    ({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_AMX"}, "avx512_vnni", True, True),
])
def test_torch_int8_kernels_trusted_only_with_vnni(env, isa, fbgemm, onednn, monkeypatch):
    for k in ("FBGEMM_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    flags = AVX512 | {"avx512_vnni"}
    assert cpu._fbgemm_exact(flags, isa) == fbgemm and cpu._onednn_exact(flags, isa) == onednn


def test_this_cpu_is_described():
    info = kernels.cpu_info()
    assert info.isa in cpu.ISAS + ("none",) and info.model and info.key
    assert info.torch_capability == torch.backends.cpu.get_cpu_capability()
    assert info.isa in info.describe()


def test_failed_build_warns_once_and_layers_still_work(monkeypatch, tmp_path):
    """No compiler (or a compile error): one warning, then torch's kernels or the reference path."""
    monkeypatch.setenv("MODELPRESS_CACHE", str(tmp_path))

    def broken(build_dir):
        raise RuntimeError("Error building extension: c++: command not found")

    monkeypatch.setattr(build, "_compile", broken)
    build.load.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="native CPU kernels unavailable.*command not found"):
            assert build.load() is None
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert build.load() is None  # warned once
            q = QuantLinear.from_float(nn.Linear(64, 16), "int8", "int8")
            x = torch.randn(3, 64)
            assert kernels.select(q, x) in (None, "int_mm")
            assert torch.allclose(q(x), q.reference(x), rtol=1e-5, atol=1e-5)
    finally:
        build.load.cache_clear()


def test_native_switched_off(monkeypatch):
    monkeypatch.setenv("MODELPRESS_NATIVE", "0")
    build.load.cache_clear()
    try:
        assert build.load() is None
        q = QuantLinear.from_float(nn.Linear(64, 16), "int4:g32")
        assert kernels.select(q, torch.randn(2, 64)) != "native"
    finally:
        build.load.cache_clear()


def test_a_killed_build_does_not_block_the_next_one(monkeypatch, tmp_path):
    """torch's build baton (`<build dir>/lock`) outlives a build that was killed, and cpp_extension would wait for
    it forever: under modelpress's own lock it is removed (with a warning) before building."""
    monkeypatch.setenv("MODELPRESS_CACHE", str(tmp_path))
    seen = []

    def compiled(build_dir):
        seen.append((build_dir / "lock").exists())
        return type("Module", (), {})()

    build_dir = build.cache_root() / f"build-{build.source_hash()}"
    build_dir.mkdir(parents=True)
    (build_dir / "lock").write_text("")  # what a killed build leaves
    monkeypatch.setattr(build, "_compile", compiled)
    build.load.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="stale build lock"):
            assert build.load() is not None
        assert seen == [False]
        assert not build.clear_stale_baton(build_dir)  # nothing left to remove
    finally:
        build.load.cache_clear()


def test_sanitizer_build_has_its_own_folder_and_flags(monkeypatch):
    """MODELPRESS_SANITIZE=1 (.ci/run) builds with ASan + UBSan into another folder: never mixed with the fast build."""
    monkeypatch.delenv("MODELPRESS_SANITIZE", raising=False)
    plain_hash, plain = build.source_hash(), build.flags()
    monkeypatch.setenv("MODELPRESS_SANITIZE", "1")
    assert build.source_hash() != plain_hash
    assert "-fsanitize=address,undefined" in build.flags() and not any("sanitize" in f for f in plain)
    f = build.flags()
    assert f.index("-O1") > f.index("-O3")  # the last -O wins: -O1, as the sanitizers advise
