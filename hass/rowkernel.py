"""The 'rows' kernel: the target's linear layers for a few rows, streamed once (the CPU default).

A verify forward multiplies every weight by a handful of rows (the tree's tokens). oneDNN's
packed fp32 kernel, on the 2-core AVX2 EPYC this project is measured on, reads the weights
well below the memory's speed for one row and pays each extra row as compute that does not
overlap the reads. `csrc/rows.c` streams each weight block once, front to back, and
multiplies it into up to twelve rows held in registers (tiles of 3 rows x 32 columns, 4 rows
x 24, 6 rows x 16 or 12 x 8: whichever passes over the weights fewest times for the row count;
the int8 form below, which pays its widening once per pass, has its own choice).
`python -m hass cost --kernels rows` and `--kernels onednn` print the two cost tables; `make
avx2-doc` runs plain decoding on both side by side.

Each output is one FMA chain over the input in increasing order, whatever the row count, the
tiling or the threads, so row i of an N-row product is bit for bit the one-row product of row
i: the linear layers of a verify forward give exactly what plain steps' give.

A weight is packed in the smallest stored form that gives it back exactly (`pack_rows_exact`):
int8 with a scale per 32 inputs (a dequantised GGUF Q8_0 tensor, such as the default model's
output head), fp16, or fp32. The kernel widens it to the same fp32 value before the FMA, so the
form changes the bytes read, never a product.

The C source ships with the package and is compiled on first use with the system's C
compiler into the cache (`HASS_CACHE/kernels`, keyed by the source, the flags and the
compiler); it runs on x86-64 CPUs with AVX2, FMA and F16C. Where it cannot be built or loaded,
`rows_unavailable` says why and the caller keeps another kernel. Threads: OpenMP, sharing
torch's runtime (the library's `libgomp.so.1` resolves to the one torch has loaded).
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Callable

import torch

from .device import _cpuinfo

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "rows.c"
ATTENTION_SOURCE = SOURCE.with_name("attend.c")
FLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-funroll-loops", "-fPIC", "-shared")
BLOCK = 8      # output columns per packed block


def _cpu_reason() -> str | None:
    """Why this CPU cannot run the kernel (None when it can)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"the kernel is x86-64 code (this is {platform.machine()})"
    flags = set(_cpuinfo().get("flags", "").split())
    missing = [f for f in ("avx2", "fma", "f16c") if f not in flags]
    if not missing:
        return None
    return f"this CPU lacks {', '.join(missing[:-1])} and {missing[-1]}" if len(missing) > 1 else \
        f"this CPU lacks {missing[0]}"


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def _build(out_dir: Path) -> Path:
    """Compile the kernel into `out_dir` (atomically; reused when already there)."""
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler (cc or gcc) on PATH to build the kernel")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    sources = (SOURCE, ATTENTION_SOURCE)
    key = hashlib.sha256(b"".join(f.read_bytes() for f in sources) + " ".join(FLAGS).encode()
                         + version.encode()).hexdigest()[:16]
    lib = out_dir / f"rows-{key}.so"
    if lib.is_file():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    log.info("building the rows kernel with %s (once; cached in %s)", cc, out_dir)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        for openmp in (["-fopenmp"], []):           # without OpenMP the kernel runs on one thread
            done = subprocess.run([cc, *FLAGS, *openmp, *map(str, sources), "-o", tmp], capture_output=True,
                                  text=True, timeout=300)
            if done.returncode == 0:
                if not openmp:
                    log.warning("the rows kernel was built without OpenMP: it runs on one thread")
                os.replace(tmp, lib)
                return lib
        raise RuntimeError(f"{cc} could not build {SOURCE.name}: {done.stderr.strip()[-500:]}")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@lru_cache(maxsize=None)
def _load(out_dir: str) -> ctypes.CDLL | str:
    """The loaded library, or the reason there is none (cached per process: built once)."""
    reason = _cpu_reason()
    if reason:
        return reason
    try:
        lib = ctypes.CDLL(str(_build(Path(out_dir))))
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        return str(exc)
    # the linear entry points: (x, M, K, w, [q8 scales,] N, bias, y, threads)
    head = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
    tail = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    for name, scales in (("rows_linear", []), ("rows_linear_f16", []), ("rows_linear_q8", [ctypes.c_void_p])):
        fn = getattr(lib, name)
        fn.argtypes = head + scales + tail
        fn.restype = None
    fn = lib.rows_attention
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long,
                   ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long,
                   ctypes.c_void_p, ctypes.c_long, ctypes.c_void_p, ctypes.c_long, ctypes.c_float, ctypes.c_void_p,
                   ctypes.c_int]
    fn.restype = ctypes.c_int
    return lib


def _library() -> ctypes.CDLL | str:
    from .target import cache_root          # late: hass.target imports the kernels
    return _load(str(cache_root() / "kernels"))


def rows_unavailable() -> str | None:
    """Why the rows kernel cannot run here (None when it can; builds it on first call)."""
    lib = _library()
    return lib if isinstance(lib, str) else None


def pack_rows(weight: torch.Tensor) -> torch.Tensor:
    """[N, K] -> [N/8, K, 8]: eight output columns side by side for every input index."""
    n, k = weight.shape
    packed = weight.detach().reshape(n // BLOCK, BLOCK, k).transpose(1, 2).clone(memory_format=torch.contiguous_format)
    if packed.data_ptr() % 32:       # the kernel loads whole 32-byte blocks (torch allocates at 64)
        raise RuntimeError("the packed weight is not 32-byte aligned")
    return packed


Q8_GROUP = 32          # inputs per scale in the q8 form


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(torch.equal(a.contiguous().view(torch.int32), b.contiguous().view(torch.int32)))


def pack_rows_exact(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`pack_rows` in the smallest stored form that gives back every fp32 weight bit for bit:
    int8 with an fp32 scale per 32 inputs of each output (the q8 form: w = q * d, which a GGUF
    Q8_0 tensor dequantises to, as the default model's tied embedding and output head do), else
    fp16 (a draft saved in fp16), else fp32. Returns (packed [N/8, K, 8] int8 / fp16 / fp32, the
    q8 scales [N/8, K/32, 8] or None). The kernel widens the stored weight to that very fp32
    value before its FMA: the products are the fp32 kernel's, and fewer bytes stream in."""
    w = weight.detach().float()
    n, k = w.shape
    if k % Q8_GROUP == 0 and _q8(w[:BLOCK]) is not None:          # a first block of rows says no cheaply
        q8 = _q8(w)
        if q8 is not None:
            q, scale = q8
            scales = scale.reshape(n // BLOCK, BLOCK, k // Q8_GROUP).transpose(1, 2).contiguous()
            return pack_rows(q.to(torch.int8)), scales
    if _same_bits(w[:BLOCK].half().float(), w[:BLOCK]):
        half = w.half()
        if _same_bits(half.float(), w):
            return pack_rows(half), None
    return pack_rows(w), None


def _q8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(q [N, K] as floats, scales [N, K/32, 1]) with q * scale bit for bit w, or None."""
    if not bool(torch.isfinite(w).all()):
        return None
    n, k = w.shape
    blocks = w.reshape(n, k // Q8_GROUP, Q8_GROUP)
    scale = blocks.abs().amax(-1, keepdim=True) / 127
    q = torch.where(scale > 0, blocks / torch.where(scale > 0, scale, 1.0), 0.0).round()
    if bool((q.abs() <= 127).all()) and _same_bits(q * scale, blocks):
        return q.reshape(n, k), scale
    return None


def _entry(name: str) -> Callable:
    """An entry point of the library (built on first call); RuntimeError saying why where it
    cannot run. Callers keep it: finding it goes through the cache's path (~20 us a lookup,
    timed ad hoc), too slow for each of the ~210 products of a forward."""
    lib = _library()
    if isinstance(lib, str):
        raise RuntimeError(f"the rows kernel is not available: {lib}")
    return getattr(lib, name)


def rows_kernel() -> Callable[..., None]:
    """The linear layers' entry point (`csrc/rows.c`), as `_entry`."""
    return _entry("rows_linear")


def attention_kernel() -> Callable[..., int]:
    """The row-independent attention's entry point (`csrc/attend.c`), as `_entry`."""
    return _entry("rows_attention")


def rows_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                   scale: float, kernel: Callable[..., int]) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v for one sequence on a CPU, fp32: query [1, H, N, D], key
    and value [1, KV, L, D] (grouped heads: H a multiple of KV), mask None (causal: query i
    sees keys up to L - N + i), additive float [1, 1, N, >= L] (a key is hidden where its
    entry is below -1e30) or boolean (True: visible). Returns [1, N, H, D]. Each query row is
    computed alone, in one fixed order (`csrc/attend.c`): bit for bit the same whatever the
    other rows, the masked keys between its visible ones or the threads."""
    _, heads, n, d = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    key = key if key.stride(3) == 1 and key.stride(2) == d else key.contiguous()
    value = value if value.stride(3) == 1 and value.stride(2) == d else value.contiguous()
    query = query if query.stride(3) == 1 else query.contiguous()
    additive = allow = None
    if mask is not None:
        rows = mask[0, 0, :, :length]
        rows = rows if rows.stride(1) == 1 else rows.contiguous()
        if rows.dtype == torch.bool:
            allow = rows
        else:
            additive = rows
    out = torch.empty(1, n, heads, d, dtype=query.dtype)
    status = kernel(query.data_ptr(), heads, n, d, query.stride(1), query.stride(2), key.data_ptr(),
                    value.data_ptr(), kv_heads, length, key.stride(1), value.stride(1),
                    None if additive is None else additive.data_ptr(), 0 if additive is None else additive.stride(0),
                    None if allow is None else allow.data_ptr(), 0 if allow is None else allow.stride(0), float(scale),
                    out.data_ptr(), torch.get_num_threads())
    if status:
        raise RuntimeError(f"rows attention failed (status {status}: {'shape' if status == 1 else 'memory'})")
    return out


def rows_kernel_for(packed: torch.Tensor) -> Callable[..., None]:
    """The entry point that reads a packed weight of this stored form (`pack_rows_exact`)."""
    return _entry({torch.float32: "rows_linear", torch.float16: "rows_linear_f16",
                   torch.int8: "rows_linear_q8"}[packed.dtype])


def rows_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int,
                kernel: Callable[..., None], scales: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] (fp32, CPU) times the packed weight, plus bias: [..., N]; `kernel` from
    `rows_kernel` (fp32) or `rows_kernel_for` (any stored form; `scales`: the q8 form's)."""
    x = x if x.is_contiguous() else x.contiguous()
    k = x.shape[-1]
    y = torch.empty(*x.shape[:-1], out_features, dtype=x.dtype)
    bias_ptr = None if bias is None else bias.data_ptr()
    if scales is None:
        kernel(x.data_ptr(), x.numel() // k, k, packed.data_ptr(), out_features, bias_ptr, y.data_ptr(),
               torch.get_num_threads())
    else:
        kernel(x.data_ptr(), x.numel() // k, k, packed.data_ptr(), scales.data_ptr(), out_features, bias_ptr,
               y.data_ptr(), torch.get_num_threads())
    return y


__all__ = ["attention_kernel", "pack_rows", "pack_rows_exact", "rows_attention", "rows_kernel", "rows_kernel_for",
           "rows_linear", "rows_unavailable"]
