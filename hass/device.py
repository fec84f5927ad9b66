"""Device and dtype resolution: one place decides, nothing is hard-coded elsewhere."""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch

_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "fp16": torch.float16, "float16": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' picks CUDA when present, else MPS, else the CPU."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"unknown device {device!r} (use auto, cpu, cuda, cuda:N or mps)") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available on this machine")
    return dev


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """'auto': bf16 on CUDA when supported (else fp16), fp32 elsewhere (CPU half is slow and lossy)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r} (use auto, fp32, fp16 or bf16)")
    return _DTYPES[dtype]


BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def _cpuinfo(text: str | None = None) -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (`text` instead of reading it; {} where
    there is none): the first speaks for all, so parsing stops at the blank line after it
    (a container on a large host sees every one of the host's cores)."""
    if text is None:
        try:
            text = Path("/proc/cpuinfo").read_text()
        except OSError:
            return {}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip() and fields:
            break
        if ":" in line:
            key, value = (s.strip() for s in line.split(":", 1))
            fields.setdefault(key, value)
    return fields


def cpu_has_fast_bf16() -> bool:
    """True when this CPU multiplies bf16 natively (AVX512-BF16 or AMX): there a bf16 matmul
    is many times faster than fp32 for the draft's small, wide products."""
    return bool(BF16_FLAGS & set(_cpuinfo().get("flags", "").split()))


def cpu_description(cpuinfo: str | None = None) -> str:
    """The CPU in the words its speed here depends on: the model name, the family and model
    ("AMD EPYC" alone may be a Zen 3 or a Zen 4, which verify a draft tree at very different
    costs), its widest vector instructions and whether it computes bf16 natively, e.g.
    'AMD EPYC (family 25, model 1; AVX2, no AVX-512; bf16 not native)'. `cpuinfo`: the text
    of /proc/cpuinfo (read when None); without one, the platform's processor name."""
    import platform
    fields = _cpuinfo(cpuinfo)
    name = fields.get("model name") or platform.processor() or platform.machine()
    flags = set(fields.get("flags", "").split())
    if not flags:                                  # not x86 (or no cpuinfo): the name is all we know
        return name
    where = ", ".join(f"{label} {fields[key]}" for key, label in (("cpu family", "family"), ("model", "model"))
                      if key in fields)
    widest = ("AMX" if "amx_tile" in flags else "AVX-512" if "avx512f" in flags
              else "AVX2, no AVX-512" if "avx2" in flags else "no AVX2")
    bf16 = "bf16 native" if flags & BF16_FLAGS else "bf16 not native"
    return f"{name} ({where + '; ' if where else ''}{widest}; {bf16})"


def resolve_feature_dtype(dtype: str, device: str, kept: str | None = None) -> str:
    """The target's precision for prepared features. 'bf16-if-native' takes bf16 where the
    device computes it natively (CUDA with bf16, CPUs with AVX512-BF16 / AMX: 1.5-1.7x the
    fp32 tokens/s) and otherwise 'auto': on an AVX2-only CPU bf16 matmuls are emulated and
    far slower than fp32, so a stage asking for bf16 everywhere would crawl there. `kept` is
    the precision of the folder being continued (a folder keeps one), which then wins, so a
    stage resumed on another CPU goes on instead of being refused."""
    if dtype != "bf16-if-native":
        return dtype
    if kept is not None:
        return kept
    dev = resolve_device(device)
    if dev.type == "cuda":
        native = torch.cuda.is_bf16_supported()
    else:
        native = dev.type == "cpu" and cpu_has_fast_bf16()
    return "bf16" if native else "auto"


def resolve_draft_dtype(dtype: str | torch.dtype, device: torch.device, target_dtype: torch.dtype) -> torch.dtype:
    """The draft's precision. It only decides which tokens are proposed, never the output
    (the target verifies every token), so 'auto' takes bf16 on CPUs that compute it natively
    and otherwise the target's dtype."""
    if dtype == "auto":
        if device.type == "cpu" and target_dtype == torch.float32 and cpu_has_fast_bf16():
            return torch.bfloat16
        return target_dtype
    return resolve_dtype(dtype, device)


def usable_cpus(cgroup: Path | str = "/sys/fs/cgroup") -> int:
    """CPUs this process may really use: the affinity mask and the cgroup CPU quota.

    `os.cpu_count()` (and torch's default thread count) report the host's cores; in a
    container (a Hugging Face Space has 2 vCPUs on a large host) the quota is what counts,
    and running more threads than it allows makes every forward wait on throttling.
    """
    cgroup = Path(cgroup)
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = None
    try:                                                  # cgroup v2: "max 100000" or "200000 100000"
        parts = (cgroup / "cpu.max").read_text().split()
        if parts[0] != "max":
            quota = int(parts[0]) / int(parts[1])
    except (OSError, ValueError, IndexError):
        try:                                              # cgroup v1
            q = int((cgroup / "cpu" / "cpu.cfs_quota_us").read_text())
            p = int((cgroup / "cpu" / "cpu.cfs_period_us").read_text())
            quota = q / p if q > 0 and p > 0 else None
        except (OSError, ValueError):
            quota = None
    if quota is not None:
        n = min(n, max(1, math.ceil(quota)))
    return max(1, n)


def fit_threads(requested: int = 0, spare: int = 0) -> int:
    """Set torch's CPU threads: `requested` if > 0, else the usable CPUs minus `spare`
    (the web app keeps one for its server); never more than torch's own default."""
    n = requested if requested > 0 else max(1, min(torch.get_num_threads(), usable_cpus() - spare))
    torch.set_num_threads(n)
    return n
