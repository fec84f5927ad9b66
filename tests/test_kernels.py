"""Packed linear layers (oneDNN's and the project's rows kernel): same products, same
decoding, clean fallbacks.

The rows kernel is the CPU default where it builds, else oneDNN (`load_target(kernels="auto")`,
and the tiny test target mirrors it), so the greedy and sampling suites already run on it.
Here: the layers themselves, the swap (weights shared, ties kept, state_dict unchanged), the
rollback when packing fails, the rows kernel's bit-exact rows, and that greedy output does
not depend on the kernel choice.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hass import kernels as K
from hass import rowkernel as R
from hass.__main__ import main
from hass.decode import GenerationConfig, plain_generate, speculative_generate
from hass.target import load_target
from hass.tree import TreeConfig

needs_onednn = pytest.mark.skipif(not K.onednn_available(), reason="this torch build has no oneDNN")


@needs_onednn
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_matches_f_linear(dtype, bias):
    if dtype not in K.packable_dtypes():
        pytest.skip("this CPU has no oneDNN bf16 path (AVX2 only): bf16 weights are not packed here")
    torch.manual_seed(0)
    lin = nn.Linear(96, 200, bias=bias).to(dtype).requires_grad_(False)
    packed = K.PackedLinear.wrap(lin)
    assert packed.weight is lin.weight and packed.bias is lin.bias
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=0.1, rtol=2e-2)
    for shape in [(1, 96), (4, 96), (17, 96), (2, 5, 96), (1, 0, 96)]:
        x = torch.randn(shape).to(dtype)
        with torch.inference_mode():
            got = packed(x)
        assert got.shape == (*shape[:-1], 200) and got.dtype == dtype
        torch.testing.assert_close(got.float(), F.linear(x, lin.weight, lin.bias).float(), **tol)
    x = torch.randn(2, 96, 3).to(dtype).transpose(1, 2)             # a non-contiguous [2, 3, 96] view
    with torch.inference_mode():
        got = packed(x)
    assert got.shape == (2, 3, 200)
    torch.testing.assert_close(got.float(), F.linear(x, lin.weight, lin.bias).float(), **tol)


@needs_onednn
def test_packed_linear_falls_back_for_autograd():
    """Training through a packed layer must still get gradients (oneDNN's op has none)."""
    torch.manual_seed(0)
    lin = nn.Linear(8, 4)
    packed = K.PackedLinear.wrap(lin)
    x = torch.randn(3, 8, requires_grad=True)
    packed(x).sum().backward()
    assert x.grad is not None and lin.weight.grad is not None
    torch.testing.assert_close(x.grad, lin.weight.sum(0).expand(3, 8).detach())


@needs_onednn
def test_pack_linears_shares_weights_and_keeps_state(tiny_folder):
    stock = load_target(str(tiny_folder), kernels="stock")
    packed = load_target(str(tiny_folder), kernels="onednn")
    assert stock.kernels == "stock" and packed.kernels == "onednn"
    assert not any(isinstance(m, K.PackedLinear) for m in stock.model.modules())
    layers = [m for m in packed.model.modules() if isinstance(m, nn.Linear)]
    assert layers and all(isinstance(m, K.PackedLinear) for m in layers)
    # tied embedding and lm_head stay one tensor; the state_dict has the same keys and values
    assert packed.lm_head.weight is packed.embed_tokens.weight
    a, b = stock.model.state_dict(), packed.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ids = torch.randint(0, stock.vocab_size, (1, 12), generator=torch.Generator().manual_seed(1))
    la, fa = stock.forward(ids, stock.new_cache())
    lb, fb = packed.forward(ids, packed.new_cache())
    torch.testing.assert_close(lb, la, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fb, fa, atol=1e-4, rtol=1e-4)


@needs_onednn
def test_failed_packing_leaves_the_stock_layers(make_target, monkeypatch):
    """A pack that disagrees with F.linear (or raises) midway rolls every swapped layer back."""
    target = make_target(kernels="stock")
    calls = []

    def check(layer):
        calls.append(layer)
        if len(calls) == 3:
            raise RuntimeError("packed product differs")
    monkeypatch.setattr(K, "_check", check)
    assert K.pack_linears(target.model) == 0
    assert len(calls) == 3
    assert not any(isinstance(m, K.PackedLinear) for m in target.model.modules())


def test_resolve_kernels():
    cpu = torch.device("cpu")
    assert K.resolve_kernels("stock", cpu, torch.float32) == "stock"
    assert K.resolve_kernels("auto", cpu, torch.float16) == "stock"       # no oneDNN fp16 path chosen
    assert K.resolve_kernels("auto", torch.device("meta"), torch.float32) == "stock"
    want = "rows" if R.rows_unavailable() is None else "onednn" if K.onednn_available() else "stock"
    assert K.resolve_kernels("auto", cpu, torch.float32) == want
    with pytest.raises(ValueError, match="unknown kernels"):
        K.resolve_kernels("fast", cpu, torch.float32)
    with pytest.raises(ValueError, match="need a CPU model"):
        K.resolve_kernels("onednn", torch.device("meta"), torch.float32)


@needs_onednn
def test_greedy_output_does_not_depend_on_the_kernels(make_target, oracle_draft, prompts, run):
    """Plain and speculative greedy decoding give the same tokens with stock and packed
    kernels (the tiny target is peaked: rounding differences cannot flip an argmax)."""
    stock, packed = make_target(kernels="stock"), make_target(kernels="onednn")
    assert (stock.kernels, packed.kernels) == ("stock", "onednn")
    cfg = GenerationConfig(max_new_tokens=16, tree=TreeConfig(16, 4, 4), stop_at_eos=False)
    for p in prompts(6, stock.vocab_size, 1, 30, seed=7):
        want, _ = run(plain_generate(stock, p, cfg))
        assert run(plain_generate(packed, p, cfg))[0] == want
        assert run(speculative_generate(packed, oracle_draft(packed, p, corrupt_every=3), p, cfg))[0] == want


def test_cli_kernels_flag(tiny_folder, tmp_path, capsys):
    rc = main(["generate", "--model", str(tiny_folder), "--draft", "none", "--prompt", "Hi", "--kernels", "stock",
               "--max-new-tokens", "3", "--total-tokens", "4", "--depth", "2", "--top-k", "2", "--json"])
    assert rc == 0
    with pytest.raises(SystemExit):
        main(["generate", "--model", str(tiny_folder), "--prompt", "Hi", "--kernels", "fast"])
    assert "invalid choice: 'fast'" in capsys.readouterr().err


@needs_onednn
def test_packed_linear_repacks_after_an_in_place_weight_change():
    """load_state_dict or an optimizer step changes the weight in place: no stale product."""
    torch.manual_seed(0)
    lin = nn.Linear(16, 8).requires_grad_(False)
    packed = K.PackedLinear.wrap(lin)
    x = torch.randn(2, 16)
    with torch.no_grad():
        lin.weight.mul_(-3.0)
    with torch.inference_mode():
        got = packed(x)
    torch.testing.assert_close(got, F.linear(x, lin.weight, lin.bias), atol=1e-5, rtol=1e-5)


@needs_onednn
def test_packed_linear_follows_a_replaced_weight_and_a_new_dtype():
    """The fast path keeps what it packed beside the module's parameters: a weight replaced by
    another tensor (re-tied embeddings) is packed again, a replaced bias is the one added, and
    a layer converted to another dtype multiplies its own weight, never the stale packed copy;
    3-D inputs keep their shape."""
    torch.manual_seed(0)
    packed = K.PackedLinear.wrap(nn.Linear(16, 8).requires_grad_(False))
    x = torch.randn(2, 3, 16)
    packed.weight = nn.Parameter(torch.randn(8, 16), requires_grad=False)
    packed.bias = nn.Parameter(torch.randn(8), requires_grad=False)
    with torch.inference_mode():
        got = packed(x)
    assert got.shape == (2, 3, 8)
    torch.testing.assert_close(got, F.linear(x, packed.weight, packed.bias), atol=1e-5, rtol=1e-5)
    packed.double()
    with torch.inference_mode():
        got = packed(x.double())
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, F.linear(x.double(), packed.weight, packed.bias))


@needs_onednn
def test_the_draft_follows_the_targets_kernels(make_target):
    from hass.draft import new_draft
    from hass.drafting import Drafter
    for kernels in ("stock", "onednn"):
        target = make_target(kernels=kernels)
        draft = new_draft(target.config, seed=0, token_map=torch.arange(0, 100, 3)).eval()
        drafter = Drafter(draft, target.embed_tokens, target.lm_head)
        packed = [isinstance(m, K.PackedLinear) for m in draft.modules() if isinstance(m, nn.Linear)]
        assert all(packed) if kernels == "onednn" else not any(packed)
        assert (drafter.head._linear is not None) == (kernels == "onednn")
        x = torch.randn(3, target.hidden_size)
        torch.testing.assert_close(drafter.head.logits(x), F.linear(x, drafter.head.weight), atol=1e-4, rtol=1e-4)


@needs_onednn
def test_auto_does_not_pack_what_would_not_fit(tiny_folder, monkeypatch):
    monkeypatch.setattr(K, "memory_available", lambda: 1000)        # bytes: far less than two copies
    assert load_target(str(tiny_folder)).kernels == "stock"
    assert load_target(str(tiny_folder), kernels="onednn").kernels == "onednn"   # asked for: done
    monkeypatch.setattr(K, "memory_available", lambda: None)        # unknown: pack
    assert load_target(str(tiny_folder)).kernels == ("rows" if R.rows_unavailable() is None else "onednn")


# -- the rows kernel (hass.rowkernel, `--kernels rows`) ------------------------------------------

needs_rows = pytest.mark.skipif(R.rows_unavailable() is not None,
                                reason=f"the rows kernel is not available here: {R.rows_unavailable()}")


@needs_rows
@pytest.mark.parametrize("bias", [False, True])
def test_rows_linear_matches_a_float64_reference(bias):
    """Every row count the tiling treats differently (1-3, 4, 5-6, 7-12, more than 12, a
    narrower last column group), odd input widths, 3-D and non-contiguous inputs."""
    torch.manual_seed(0)
    for n, k in [(200, 96), (8, 13), (24, 7), (40, 1)]:
        lin = nn.Linear(k, n, bias=bias).requires_grad_(False)
        layer = K.RowsLinear.wrap(lin)
        for rows in (1, 2, 3, 4, 5, 6, 7, 8, 12, 13, 25):
            x = torch.randn(rows, k)
            with torch.inference_mode():
                got = layer(x)
            want = F.linear(x.double(), lin.weight.double(), None if lin.bias is None else lin.bias.double())
            assert got.shape == (rows, n) and got.dtype == torch.float32
            torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    lin = nn.Linear(96, 200, bias=bias).requires_grad_(False)
    x = torch.randn(2, 96, 3).transpose(1, 2)              # a non-contiguous [2, 3, 96] view
    with torch.inference_mode():
        got = K.RowsLinear.wrap(lin)(x)
    assert got.shape == (2, 3, 200)
    torch.testing.assert_close(got, F.linear(x, lin.weight, lin.bias), atol=1e-5, rtol=1e-5)


@needs_rows
def test_rows_linear_gives_each_row_the_one_row_product_bit_for_bit():
    """The kernel's promise: row i of an M-row product equals the one-row product of row i
    exactly, for every M and thread count. (oneDNN's blocked kernels make no such promise.)"""
    torch.manual_seed(1)
    lin = nn.Linear(576, 1536).requires_grad_(False)
    layer = K.RowsLinear.wrap(lin)
    x = torch.randn(20, 576)
    threads = torch.get_num_threads()
    try:
        with torch.inference_mode():
            torch.set_num_threads(1)
            alone = torch.cat([layer(x[i:i + 1]) for i in range(len(x))])
            for m in (2, 3, 4, 5, 6, 7, 8, 11, 12, 13, 20):
                assert torch.equal(layer(x[:m]), alone[:m]), m
            torch.set_num_threads(2)
            assert torch.equal(layer(x), alone)
            # the negative control: another order of the same sums (float64 then rounded) differs
            other = F.linear(x.double(), lin.weight.double(), lin.bias.double()).float()
            assert not torch.equal(other, alone)
    finally:
        torch.set_num_threads(threads)


@needs_rows
def test_rows_kernels_decode_as_the_others(make_target, oracle_draft, prompts, run):
    """A target on the rows kernel: its linear layers swapped (the weights shared), a draft
    following it onto the same kernel, and greedy output equal to the stock kernels' for
    plain and speculative decoding."""
    from hass.draft import new_draft
    from hass.drafting import Drafter
    stock, rows = make_target(kernels="stock"), make_target(kernels="rows")
    assert rows.kernels == "rows"
    layers = [m for m in rows.model.modules() if isinstance(m, nn.Linear)]
    assert layers and all(isinstance(m, K.RowsLinear) for m in layers)
    draft = new_draft(rows.config, seed=0, token_map=torch.arange(0, 128, 2)).eval()
    drafter = Drafter(draft, rows.embed_tokens, rows.lm_head)
    assert all(isinstance(m, K.RowsLinear) for m in draft.modules() if isinstance(m, nn.Linear))
    assert isinstance(drafter.head._linear, K.RowsLinear)
    cfg = GenerationConfig(max_new_tokens=16, tree=TreeConfig(16, 4, 4), stop_at_eos=False)
    for p in prompts(6, stock.vocab_size, 1, 30, seed=7):
        want, _ = run(plain_generate(stock, p, cfg))
        assert run(plain_generate(rows, p, cfg))[0] == want
        assert run(speculative_generate(rows, oracle_draft(rows, p, corrupt_every=3), p, cfg))[0] == want


def test_rows_kernels_refused_with_the_reason(monkeypatch):
    """Asked for where it cannot run: a clear message, before any model is loaded."""
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match="kernels 'rows' need a CPU model in fp32"):
        K.resolve_kernels("rows", cpu, torch.bfloat16)
    monkeypatch.setattr(K, "rows_unavailable", lambda: "no C compiler (cc or gcc) on PATH to build the kernel")
    with pytest.raises(ValueError, match="not available here: no C compiler"):
        K.resolve_kernels("rows", cpu, torch.float32)
    # auto falls back to oneDNN (or stock) and says why in the log
    assert K.resolve_kernels("auto", cpu, torch.float32) == ("onednn" if K.onednn_available() else "stock")


def test_rows_kernel_build_failures_say_why(tmp_path, monkeypatch):
    """No compiler, or a CPU without AVX2/FMA: the reason, never an exception at load time."""
    monkeypatch.setattr(R, "_compiler", lambda: None)
    if R._cpu_reason() is None:
        assert "no C compiler" in R._load(str(tmp_path / "a"))
    monkeypatch.setattr(R, "_cpuinfo", lambda: {"flags": "sse2 avx"})
    monkeypatch.setattr(R.platform, "machine", lambda: "x86_64")
    assert R._load(str(tmp_path / "b")) == "this CPU lacks avx2 and fma"
    monkeypatch.setattr(R, "_library", lambda: "this CPU lacks avx2 and fma")
    with pytest.raises(RuntimeError, match="rows kernel is not available: this CPU lacks avx2"):
        R.rows_kernel()
    monkeypatch.setattr(R.platform, "machine", lambda: "aarch64")
    assert "x86-64 code" in R._load(str(tmp_path / "c"))
