"""Matmul kernels for the target's linear layers on a CPU.

Speculative decoding pays off only if verifying a few tokens costs about as much as
decoding one. On a CPU, `nn.Linear` runs through the BLAS (MKL in the PyPI wheels), whose
fp32 kernels for 2-60 rows are compute-bound far below the machine's peak: on the 2-core
AMD EPYC this project is measured on, a 4-token forward of the default model took 1.6x a
one-token forward. oneDNN, which torch also ships, multiplies by a weight packed once
into its blocked layout and keeps small-row products memory-bound (measured with
`python -m hass cost`). The packing keeps the fp32 weights (no quantisation): results differ from the
BLAS only in rounding order, as any change of kernel or row count does.

`pack_linears` swaps every `nn.Linear` of a model for a `PackedLinear` that shares the
same weight parameter (so tied embeddings stay tied and `state_dict` is unchanged) and
keeps the packed copy beside it. Anything that is not a plain CPU inference product
(autograd, another device, a failed pack) runs the stock `F.linear`. `RowsLinear` is the same
layer on the project's own streaming kernel (`hass.rowkernel`, `--kernels rows`).
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from .attention import give_rows_attention
from .rowkernel import pack_rows_exact, rows_kernel_for, rows_linear, rows_unavailable

log = logging.getLogger(__name__)

KERNELS = ("auto", "stock", "onednn", "rows")
_DTYPES = (torch.float32, torch.bfloat16)


def packable_dtypes() -> tuple[torch.dtype, ...]:
    """fp32 always; bf16 only where this CPU has oneDNN's bf16 path (AVX512-BW/VL/DQ or
    AVX-NE-CONVERT): on an AVX2-only CPU packing a bf16 weight raises."""
    bf16 = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return _DTYPES if bf16 is not None and bf16() else (torch.float32,)


def onednn_available() -> bool:
    """True when this torch build can pack linear weights for oneDNN (x86 builds with MKLDNN)."""
    return (torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def can_pack(weight: torch.Tensor) -> bool:
    """A weight oneDNN can pack here: on the CPU, fp32 (or bf16 where the CPU has it), in a build with oneDNN."""
    return weight.device.type == "cpu" and weight.dtype in packable_dtypes() and onednn_available()


def resolve_kernels(kernels: str, device: torch.device, dtype: torch.dtype) -> str:
    """'auto' takes the rows kernel for CPU fp32 models where it builds (x86-64 with AVX2 and
    FMA, a C compiler), else oneDNN for CPU fp32/bf16 models when the build has it, else the
    stock kernels."""
    if kernels not in KERNELS:
        raise ValueError(f"unknown kernels {kernels!r} (use {', '.join(KERNELS)})")
    if kernels == "rows":
        why = (f"a CPU model in fp32 (here: {device.type}, {dtype})"
               if device.type != "cpu" or dtype != torch.float32 else rows_unavailable())
        if why:
            raise ValueError(f"kernels 'rows' need {why}" if why.startswith("a CPU") else
                             f"kernels 'rows' are not available here: {why}")
        return kernels
    usable = device.type == "cpu" and dtype in packable_dtypes() and onednn_available()
    if kernels == "onednn" and not usable:
        raise ValueError(f"kernels 'onednn' need a CPU model in fp32 (bf16 where the CPU has oneDNN's bf16 path) "
                         f"and a torch build with oneDNN "
                         f"(here: {device.type}, {dtype}, oneDNN {'yes' if onednn_available() else 'no'})")
    if kernels == "auto":
        if device.type == "cpu" and dtype == torch.float32:
            why = rows_unavailable()
            if why is None:
                return "rows"
            log.info("the rows kernel is not available (%s): %s kernels instead", why, "oneDNN" if usable else "stock")
        return "onednn" if usable else "stock"
    return kernels


class PackedLinear(nn.Linear):
    """An `nn.Linear` that multiplies by a oneDNN-packed copy of its (shared, frozen) weight."""

    kind = "onednn"

    @classmethod
    def fits(cls, weight: torch.Tensor) -> bool:
        """Whether this kernel can multiply by `weight` here."""
        return can_pack(weight)

    @staticmethod
    def pack_weight(weight: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)

    def product(self, x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        # the op takes [..., in] as it is and returns [..., out]: no reshape / view around it
        # (a fresh view costs the op ~10 us of bookkeeping a call, ~210 calls a forward: timed
        # ad hoc on the 2-core AMD EPYC; the products are bit for bit the same)
        return torch.ops.mkldnn._linear_pointwise(x if x.is_contiguous() else x.contiguous(), packed, bias,
                                                  "none", [], "")

    packed: torch.Tensor | None = None
    packed_dtype: torch.dtype | None = None
    packed_version: int | None = None
    _packed_of: torch.Tensor | None = None

    @classmethod
    def wrap(cls, linear: nn.Linear) -> "PackedLinear":
        return cls.of(linear.weight, linear.bias)   # the same Parameters: ties and state_dict unchanged

    @classmethod
    def of(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> "PackedLinear":
        """A packed layer over existing tensors (parameters are kept as they are, not copied)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.out_features, new.in_features = weight.shape
        for name, t in (("weight", weight), ("bias", bias)):
            if t is None or isinstance(t, nn.Parameter):
                setattr(new, name, t)
            else:
                new.register_buffer(name, t, persistent=False)
        new.repack()
        return new

    def repack(self) -> None:
        """Pack the current weight (again: an in-place change of the weight bumps its version)."""
        w = self.weight
        self.packed = self.pack_weight(w)
        self.packed_dtype = w.dtype
        object.__setattr__(self, "_packed_of", w)     # a plain attribute: not registered a second time
        # inference tensors (made under inference_mode, e.g. a token-map slice) have no version counter
        self.packed_version = None if w.is_inference() else w._version

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Runs ~210 times per forward of the default model: every check reads plain attributes
        # and dicts (a parameter read through nn.Module.__getattr__ costs ~2 us; the checks
        # through it took 2-6 % of a one-token forward on the 2-core CPU, 1.5-6 ms of 90-97 ms
        # in three side-by-side runs)
        packed = self.packed
        if (packed is None or not x.is_cpu or x.dtype != self.packed_dtype or not x.numel()
                or (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))):
            return F.linear(x, self.weight, self.bias)
        params = self._parameters
        w = params["weight"] if "weight" in params else self._buffers["weight"]
        if w is not self._packed_of or (self.packed_version is not None and w._version != self.packed_version):
            # replaced, or changed in place since packing (load_state_dict, an optimizer step): pack again
            self.repack()
            packed = self.packed
        bias = params["bias"] if "bias" in params else self._buffers.get("bias")     # None: no bias
        return self.product(x, packed, bias)


class RowsLinear(PackedLinear):
    """A `PackedLinear` on the streaming 'rows' kernel (`hass.rowkernel`): fp32, eight output
    columns per packed block, each row's product independent of how many rows come along."""

    kind = "rows"

    @classmethod
    def fits(cls, weight: torch.Tensor) -> bool:
        return (weight.device.type == "cpu" and weight.dtype == torch.float32 and weight.dim() == 2
                and weight.shape[0] % 8 == 0 and rows_unavailable() is None)

    scales: torch.Tensor | None = None

    def pack_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight in its smallest exact stored form (`hass.rowkernel.pack_rows_exact`), with
        the entry point that reads it kept beside it (a lookup per product is slow)."""
        packed, self.scales = pack_rows_exact(weight)
        self.kernel = rows_kernel_for(packed)
        return packed

    def product(self, x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return rows_linear(x, packed, None if bias is None else bias.contiguous(), self.out_features, self.kernel,
                           self.scales)


LAYERS = {"onednn": PackedLinear, "rows": RowsLinear}


def linear_bytes(model: nn.Module) -> int:
    """Bytes a packed copy of the model's linear weights takes (the extra memory of packing)."""
    return sum(m.weight.numel() * m.weight.element_size() for m in model.modules() if type(m) is nn.Linear)


def memory_available() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (None where there is no such file)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def pack_fits(model: nn.Module) -> bool:
    """Packing keeps a second copy of the weights: 'auto' only packs when that copy takes
    less than half of the free memory (a large model on a small machine stays stock)."""
    free = memory_available()
    return free is None or 2 * linear_bytes(model) < free


def apply_kernels(model: nn.Module, kernels: str, device: torch.device, dtype: torch.dtype) -> str:
    """Put a model (already on `device`) on the kernels asked for; return the ones it runs on.

    'auto' packs for the rows kernel or oneDNN where usable and where the packed copy fits in
    memory; an explicit 'rows' / 'onednn' packs regardless of memory; a failed pack leaves the
    stock kernels.
    """
    kern = resolve_kernels(kernels, device, dtype)
    if kern in LAYERS and kernels == "auto" and not pack_fits(model):
        log.info("not packing the weights for %s: a second copy would not fit in free memory", kern)
        return "stock"
    if kern in LAYERS and not pack_linears(model, LAYERS[kern]):
        return "stock"
    return kern


def follow_target(draft: nn.Module, lm_head: nn.Module) -> bool:
    """Run a draft on the kernels of its target: when the target's head is packed, pack the
    draft's linear layers with the same kernel (idempotent) and return True, so its head is
    packed as well. On the rows kernel its attention layers get the rows kernel's attention
    too, as the target's do (`hass.attention.give_rows_attention`)."""
    if not isinstance(lm_head, PackedLinear):
        return False
    pack_linears(draft, type(lm_head))
    if type(lm_head) is RowsLinear:
        give_rows_attention(draft)
    return True


def pack_linears(model: nn.Module, layer: type[PackedLinear] = PackedLinear) -> int:
    """Replace the model's `nn.Linear`s by `layer`s (`PackedLinear`: oneDNN, `RowsLinear`:
    the rows kernel) in place, where that kernel fits the weight; return how many.

    Each packed layer is checked against `F.linear` on a random input once; if packing fails
    or disagrees beyond fp rounding, the model is left with its stock layers and 0 returned.
    """
    names = [(name, mod) for name, mod in model.named_modules() if type(mod) is nn.Linear and layer.fits(mod.weight)]
    swapped: list[tuple[str, nn.Linear]] = []
    try:
        for name, mod in names:
            packed = layer.wrap(mod)
            _check(packed)
            model.set_submodule(name, packed)
            swapped.append((name, mod))
    except Exception as exc:                      # noqa: BLE001 - any failure means: keep the stock kernels
        for name, mod in swapped:
            model.set_submodule(name, mod)
        log.warning("packing for %s failed (%s: %s); using the stock kernels", layer.kind, type(exc).__name__, exc)
        return 0
    return len(swapped)


@torch.inference_mode()
def _check(layer: PackedLinear) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, layer.in_features, generator=gen).to(layer.weight.dtype)
    want, got = F.linear(x, layer.weight, layer.bias).float(), layer(x).float()
    tol = 1e-4 if layer.weight.dtype == torch.float32 else 3e-2
    if got.shape != want.shape or not torch.allclose(got, want, rtol=tol, atol=tol * float(want.abs().max() + 1)):
        raise RuntimeError(f"packed product differs from F.linear (max diff {float((got - want).abs().max()):.2e})")
