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
            for m in (2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 20):
                assert torch.equal(layer(x[:m]), alone[:m]), m
            torch.set_num_threads(2)
            assert torch.equal(layer(x), alone)
            # the negative control: another order of the same sums (float64 then rounded) differs
            other = F.linear(x.double(), lin.weight.double(), lin.bias.double()).float()
            assert not torch.equal(other, alone)
    finally:
        torch.set_num_threads(threads)


def _q8_weight(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """A weight as a GGUF Q8_0 tensor dequantises: int8 q times an fp16 scale per 32 inputs."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-127, 128, (n, k // 32, 32), generator=g).float()
    q[:, :, 0] = 127                                           # Q8_0 maps each block's largest to +-127
    d = (torch.rand(n, k // 32, 1, generator=g) * 0.02).half().float()
    return (q * d).reshape(n, k)


@needs_rows
def test_rows_weights_are_stored_in_their_smallest_exact_form_and_multiply_bit_for_bit():
    """q8 (int8 + a scale per 32 inputs) where that gives the weights back exactly, else fp16
    where that does, else fp32; every form multiplies to the fp32 kernel's products exactly,
    for every tile shape (row counts 1-14 and 20: each form has its own tiling; a narrower
    last column group)."""
    torch.manual_seed(3)
    q8 = _q8_weight(200, 96)
    half = torch.randn(200, 96).half().float()
    off = q8.clone()
    off[7, 40] = torch.nextafter(off[7, 40], torch.tensor(1.0))     # one weight a step off its q * d
    cases = {"q8": (q8, torch.int8), "fp16": (half, torch.float16), "fp32": (torch.randn(200, 96), torch.float32),
             "one off": (off, torch.float32), "fp32 (K not a multiple of 32)": (torch.randn(40, 13), torch.float32)}
    fp32 = R.rows_kernel()
    for name, (w, dtype) in cases.items():
        packed, scales = R.pack_rows_exact(w)
        assert packed.dtype == dtype and (scales is not None) == (dtype == torch.int8), name
        for rows in (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 20):
            x = torch.randn(rows, w.shape[1])
            want = R.rows_linear(x, R.pack_rows(w), None, w.shape[0], fp32)
            got = R.rows_linear(x, packed, None, w.shape[0], R.rows_kernel_for(packed), scales)
            assert torch.equal(got, want), (name, rows)
    # a zero block with a negative zero in it is not q8 (q * d would give +0): fp16 keeps the sign
    z = q8.clone()
    z[3, :32] = 0.0
    z[3, 5] = -0.0
    assert R.pack_rows_exact(z)[0].dtype != torch.int8
    # the layer picks the form: the default model's output head is a Q8_0 tensor
    lin = nn.Linear(96, 200, bias=True).requires_grad_(False)
    lin.weight.copy_(q8)
    layer = K.RowsLinear.wrap(lin)
    assert layer.packed.dtype == torch.int8
    x = torch.randn(3, 96)
    with torch.inference_mode():
        assert torch.equal(layer(x), R.rows_linear(x, R.pack_rows(q8), lin.bias, 200, fp32))
    with torch.no_grad():
        lin.weight.add_(torch.randn(200, 96))              # changed in place: packed again, now fp32
    with torch.inference_mode():
        assert torch.equal(layer(x), R.rows_linear(x, R.pack_rows(lin.weight), lin.bias, 200, fp32))
    assert layer.packed.dtype == torch.float32 and layer.scales is None


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
    """No compiler, or a CPU without AVX2/FMA/F16C: the reason, never an exception at load time."""
    monkeypatch.setattr(R, "_compiler", lambda: None)
    if R._cpu_reason() is None:
        assert "no C compiler" in R._load(str(tmp_path / "a"))
    monkeypatch.setattr(R, "_cpuinfo", lambda: {"flags": "sse2 avx"})
    monkeypatch.setattr(R.platform, "machine", lambda: "x86_64")
    assert R._load(str(tmp_path / "b")) == "this CPU lacks avx2, fma and f16c"
    monkeypatch.setattr(R, "_cpuinfo", lambda: {"flags": "sse2 avx avx2 fma"})        # F16C widens fp16 weights
    assert R._load(str(tmp_path / "no-f16c")) == "this CPU lacks f16c"
    monkeypatch.setattr(R, "_library", lambda: "this CPU lacks avx2 and fma")
    with pytest.raises(RuntimeError, match="rows kernel is not available: this CPU lacks avx2"):
        R.rows_kernel()
    monkeypatch.setattr(R.platform, "machine", lambda: "aarch64")
    assert "x86-64 code" in R._load(str(tmp_path / "c"))


# -- the rows kernel's attention -------------------------------------------------------------
def _attention_case(n: int, length: int, heads: int = 6, kv_heads: int = 2, dim: int = 64, seed: int = 0):
    """A query laid out as transformers lays it out ([1, H, N, D], a transposed view) and
    keys/values as views of a cache buffer with spare room, as `GrowingLayer` keeps them."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, n, heads, dim, generator=g).transpose(1, 2)
    kbuf = torch.randn(1, kv_heads, length + 37, dim, generator=g)
    vbuf = torch.randn(1, kv_heads, length + 37, dim, generator=g)
    return q, kbuf[:, :, :length], vbuf[:, :, :length]


def _reference(q, k, v, allowed):
    """float64 attention over the allowed keys ([N, L] booleans), grouped heads repeated."""
    rep = q.shape[1] // k.shape[1]
    out = F.scaled_dot_product_attention(q.double(), k.double().repeat_interleave(rep, 1),
                                         v.double().repeat_interleave(rep, 1), attn_mask=allowed)
    return out.transpose(1, 2)


def _tree_allowed(n: int, length: int, seed: int = 0) -> torch.Tensor:
    """Every row sees the prefix and a random set of ancestors in the last n keys (itself included)."""
    g = torch.Generator().manual_seed(seed)
    parents = [-1] + [int(torch.randint(0, i, (1,), generator=g)) for i in range(1, n)]
    allowed = torch.zeros(n, length, dtype=torch.bool)
    allowed[:, :length - n] = True
    for i in range(n):
        j = i
        while j >= 0:
            allowed[i, length - n + j] = True
            j = parents[j]
    return allowed


@needs_rows
@pytest.mark.parametrize("dim", [64, 32, 128])
@pytest.mark.parametrize("mask_kind", ["causal", "additive", "boolean"])
def test_rows_attention_matches_a_float64_reference(dim, mask_kind):
    kernel = R.attention_kernel()
    for n, length, kv in ((1, 1, 2), (1, 50, 2), (5, 40, 2), (9, 9, 3), (17, 120, 1)):
        q, k, v = _attention_case(n, length, heads=6, kv_heads=kv, dim=dim, seed=n)
        allowed = torch.ones(n, length, dtype=torch.bool).tril(length - n) if mask_kind == "causal" else \
            _tree_allowed(n, length, seed=n)
        mask = None if mask_kind == "causal" else allowed[None, None] if mask_kind == "boolean" else \
            torch.zeros(n, length).masked_fill(~allowed, torch.finfo(torch.float32).min)[None, None]
        out = R.rows_attention(q, k, v, mask, dim ** -0.5, kernel)
        assert out.shape == (1, n, 6, dim) and out.is_contiguous()
        assert torch.allclose(out.double(), _reference(q, k, v, allowed), atol=2e-6, rtol=1e-5), (n, length, kv)


@needs_rows
def test_rows_attention_gives_each_row_its_one_row_result_bit_for_bit():
    """The promise: a row's output is the one-row call's over exactly the keys it sees
    (contiguous, no mask), bit for bit, whatever the other rows, the hidden keys between its
    visible ones, the mask's form or the threads. That is what makes a verify forward's
    rows the plain steps'. Negative control: the same keys in another order give other bits."""
    kernel = R.attention_kernel()
    threads = torch.get_num_threads()
    q, k, v = _attention_case(12, 300, heads=9, kv_heads=3)
    allowed = _tree_allowed(12, 300, seed=3)
    additive = torch.zeros(12, 300).masked_fill(~allowed, torch.finfo(torch.float32).min)[None, None]
    try:
        alone = []
        torch.set_num_threads(1)
        for i in range(12):
            idx = allowed[i].nonzero().flatten()
            alone.append(R.rows_attention(q[:, :, i:i + 1], k[:, :, idx], v[:, :, idx], None, 0.125, kernel)[0, 0])
        alone = torch.stack(alone)
        for t in (1, 2):
            torch.set_num_threads(t)
            for mask in (additive, allowed[None, None]):
                assert torch.equal(R.rows_attention(q, k, v, mask, 0.125, kernel)[0], alone)
                assert torch.equal(R.rows_attention(q[:, :, 4:7], k, v, mask[:, :, 4:7], 0.125, kernel)[0], alone[4:7])
        causal = torch.stack([R.rows_attention(q[:, :, i:i + 1], k[:, :, :300 - 12 + i + 1], v[:, :, :300 - 12 + i + 1],
                                               None, 0.125, kernel)[0, 0] for i in range(12)])
        assert torch.equal(R.rows_attention(q, k, v, None, 0.125, kernel)[0], causal)
        idx = allowed[5].nonzero().flatten().flip(0)                  # the negative control
        shuffled = R.rows_attention(q[:, :, 5:6], k[:, :, idx], v[:, :, idx], None, 0.125, kernel)[0, 0]
        assert torch.allclose(shuffled, alone[5], atol=1e-5) and not torch.equal(shuffled, alone[5])
    finally:
        torch.set_num_threads(threads)


@needs_rows
def test_a_rows_targets_verify_forward_is_its_plain_steps_bit_for_bit(make_target):
    """On the rows kernels (linear layers and attention) a forward over N tree tokens gives
    every node exactly the logits of one-token steps along its path: for a chain (no mask)
    and for a tree (the verify mask)."""
    from hass.attention import ROWS_ATTENTION
    from hass.cache import compact
    from hass.tree import ancestor_mask, verify_mask
    target = make_target(kernels="rows", heads=4, kv_heads=2)
    assert target.model.config._attn_implementation == ROWS_ATTENTION
    g = torch.Generator().manual_seed(0)
    ctx = torch.randint(0, target.vocab_size, (1, 40), generator=g)
    toks = torch.randint(0, target.vocab_size, (1, 7), generator=g)
    parents = torch.tensor([-1, 0, 0, 1, 2, 3, 1])
    with torch.inference_mode():
        cache = target.new_cache()
        target.forward(ctx, cache)
        for tree in (torch.arange(-1, 6), parents):
            anc = ancestor_mask(tree)
            depths = anc.sum(-1) - 1
            chain = bool((tree == torch.arange(-1, 6)).all())
            mask = None if chain else verify_mask(anc, 40, torch.float32)
            logits, _ = target.forward(toks, cache, position_ids=(40 + depths)[None], attention_mask=mask)
            compact(cache, 40, torch.zeros(0, dtype=torch.long))
            for i in range(7):
                path = anc[i].nonzero().flatten()
                steps = target.new_cache()
                target.forward(ctx, steps)
                for j, node in enumerate(path.tolist()):
                    step, _ = target.forward(toks[:, node:node + 1], steps, position_ids=torch.tensor([[40 + j]]))
                assert torch.equal(step[0, -1], logits[0, i]), (chain, i)


@needs_rows
def test_rows_attention_leaves_what_it_does_not_cover_to_sdpa():
    """A batch, bf16, a mask of another form or more queries than it takes: torch's kernel,
    with what it would give."""
    from hass.attention import ROWS_MAX_QUERIES, gqa_sdpa_forward, rows_attention_forward
    module = nn.Module()
    module._hass_rows_attention = R.attention_kernel()
    module.is_causal, module.num_key_value_groups = True, 2
    q, k, v = _attention_case(3, 20, heads=4, kv_heads=2, dim=32)
    cases = [(q.expand(2, -1, -1, -1), k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1), None),
             (q.bfloat16(), k.bfloat16(), v.bfloat16(), None),
             (q, k, v, torch.zeros(3, 20))]                                   # a 2-D mask
    for qq, kk, vv, mask in cases:
        got, _ = rows_attention_forward(module, qq, kk, vv, mask, scaling=0.2)
        want, _ = gqa_sdpa_forward(module, qq, kk, vv, mask, scaling=0.2)
        assert torch.equal(got, want)
    assert ROWS_MAX_QUERIES >= 64                  # every fitted tree (up to 64 nodes) is covered
    long_q, long_k, long_v = _attention_case(ROWS_MAX_QUERIES + 1, ROWS_MAX_QUERIES + 1, heads=4, kv_heads=2, dim=32)
    got, _ = rows_attention_forward(module, long_q, long_k, long_v, None, scaling=0.2)
    want, _ = gqa_sdpa_forward(module, long_q, long_k, long_v, None, scaling=0.2)
    assert torch.equal(got, want)
    own, _ = rows_attention_forward(module, q, k, v, None, scaling=0.2)       # and what it covers, it computes
    assert torch.equal(own, R.rows_attention(q, k, v, None, 0.2, module._hass_rows_attention))


@needs_rows
def test_a_draft_on_rows_kernels_attends_on_them_as_sdpa_does(make_target, monkeypatch):
    from hass import draft as DM
    from hass.drafting import Drafter
    calls = []
    real = DM.rows_attention
    monkeypatch.setattr(DM, "rows_attention", lambda *a: calls.append(a[0].shape[2]) or real(*a))
    stock = make_target(kernels="stock")
    plain = DM.new_draft(stock.config, seed=0).eval()
    Drafter(plain, stock.embed_tokens, stock.lm_head)
    assert plain.layer.self_attn._hass_rows_attention is None         # a stock target's draft keeps SDPA
    target = make_target(kernels="rows")
    draft = DM.new_draft(target.config, seed=0).eval()
    Drafter(draft, target.embed_tokens, target.lm_head)
    attn = draft.layer.self_attn
    assert attn._hass_rows_attention is not None
    g = torch.Generator().manual_seed(0)
    feats, emb = torch.randn(1, 9, target.hidden_size, generator=g), torch.randn(1, 9, target.hidden_size, generator=g)
    pos = torch.arange(9)[None]
    tree = torch.tensor([[True, False, False], [True, True, False], [True, False, True]])    # over the last 3 keys
    mask = torch.cat((torch.ones(3, 6, dtype=torch.bool), tree), 1)[None, None]
    with torch.inference_mode():
        _, past = draft(feats[:, :6], emb[:, :6], pos[:, :6])
        for m in (None, mask):                                          # causal over a past, then a tree
            got, _ = draft(feats[:, 6:], emb[:, 6:], pos[:, 6:], past, m)
            kernel, attn._hass_rows_attention = attn._hass_rows_attention, None
            want, _ = draft(feats[:, 6:], emb[:, 6:], pos[:, 6:], past, m)      # torch's SDPA
            attn._hass_rows_attention = kernel
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            assert not torch.equal(got, draft(feats[:, 6:], emb[:, 6:], pos[:, 6:], past,
                                              None if m is not None else mask)[0])   # the mask matters
    assert calls[:3] == [6, 3, 3]
    calls.clear()
    out, _ = draft(feats, emb, pos)                # training: autograd needs SDPA
    out.sum().backward()
    assert calls == [] and draft.fc.weight.grad is not None


def test_targets_run_the_attention_of_their_kernels(make_target):
    from hass.attention import GQA_ATTENTION, ROWS_ATTENTION
    assert make_target(kernels="stock", heads=4, kv_heads=2).model.config._attn_implementation == GQA_ATTENTION
    if R.rows_unavailable() is None:
        assert make_target(kernels="rows", heads=4, kv_heads=2).model.config._attn_implementation == ROWS_ATTENTION
