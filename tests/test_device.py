"""What the benchmarks say about the CPU they ran on (`hass.device.cpu_description`)."""
from __future__ import annotations

from hass.device import cpu_description


def _cpuinfo(name: str, family: int, model: int, flags: str, processors: int = 2) -> str:
    one = (f"processor\t: {{i}}\nvendor_id\t: AuthenticAMD\ncpu family\t: {family}\nmodel\t\t: {model}\n"
           f"model name\t: {name}\nflags\t\t: fpu sse2 {flags}\n\n")
    return "".join(one.format(i=i) for i in range(processors))


def test_the_cpu_is_described_by_what_its_speed_depends_on():
    # the same "AMD EPYC" name: Zen 3 (AVX2 only) and Zen 4 (AVX-512 with native bf16) differ
    zen3 = cpu_description(_cpuinfo("AMD EPYC", 25, 1, "avx avx2 fma"))
    zen4 = cpu_description(_cpuinfo("AMD EPYC", 25, 17, "avx avx2 avx512f avx512bw avx512_bf16"))
    assert zen3 == "AMD EPYC (family 25, model 1; AVX2, no AVX-512; bf16 not native)"
    assert zen4 == "AMD EPYC (family 25, model 17; AVX-512; bf16 native)"
    spr = cpu_description(_cpuinfo("Intel(R) Xeon(R) Processor", 6, 143,
                                   "avx2 avx512f avx512_bf16 amx_bf16 amx_tile"))
    assert spr == "Intel(R) Xeon(R) Processor (family 6, model 143; AMX; bf16 native)"
    old = cpu_description(_cpuinfo("Old x86", 6, 23, "sse4_1"))
    assert old == "Old x86 (family 6, model 23; no AVX2; bf16 not native)"


def test_a_cpu_without_x86_flags_is_named_only():
    arm = "processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd\nmodel name\t: Neoverse-V2\n"
    assert cpu_description(arm) == "Neoverse-V2"
    assert cpu_description("")                    # no cpuinfo at all: the platform's own name, never empty
