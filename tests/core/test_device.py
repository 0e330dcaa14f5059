"""core/device.py: whether bf16 is native on this CPU."""

from __future__ import annotations

import builtins
import io

import pytest

from napari_medsam.core import device


@pytest.fixture
def bf16_cpu(monkeypatch):
    """/proc/cpuinfo of a CPU with AVX512-BF16, whatever this machine has."""
    real_open = builtins.open

    def fake_open(path, *a, **k):
        if str(path) == "/proc/cpuinfo":
            return io.StringIO("flags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n")
        return real_open(path, *a, **k)

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)


def test_native_bf16_from_the_cpu_flags(bf16_cpu):
    assert device.cpu_has_fast_bf16()


@pytest.mark.parametrize("cap", ["AVX2", "avx512_core", "AVX512_CORE_VNNI"])
def test_an_isa_cap_below_bf16_turns_it_off(bf16_cpu, monkeypatch, cap):
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)  # bf16 products would be emulated: ~100x slower
    assert not device.cpu_has_fast_bf16()


@pytest.mark.parametrize("cap", ["ALL", "AVX512_CORE_BF16", "AVX512_CORE_AMX"])
def test_caps_that_keep_bf16(bf16_cpu, monkeypatch, cap):
    monkeypatch.setenv("DNNL_MAX_CPU_ISA", cap)
    assert device.cpu_has_fast_bf16()
