"""GQA_ATTENTION: the tree-verify forward keeps grouped queries in torch's kernel on a CPU
(no `repeat_kv` copy of the cache) and computes what transformers' `sdpa` computes. It is the
attention of targets on oneDNN or stock kernels (here: stock); a target on the rows kernel
runs the kernel's own attention (tests/test_kernels.py)."""
import pytest
import torch
import transformers.integrations.sdpa_attention as stock

from hass.attention import GQA_ATTENTION, use_gqa_attention
from hass.tree import ancestor_mask, verify_mask


def _tree_forward(target, prefix: int = 40):
    """A prefix forward, then a 6-node tree (two branches) verified under its mask."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 100, (1, prefix), generator=g)
    cache = target.new_cache()
    target.forward(ids, cache)
    parents = torch.tensor([-1, 0, 0, 1, 2, 3])
    depths = torch.tensor([0, 1, 1, 2, 2, 3])
    tokens = torch.randint(3, 100, (6,), generator=g)
    mask = verify_mask(ancestor_mask(parents), prefix, target.dtype)
    logits, _ = target.forward(tokens[None], cache, position_ids=(prefix + depths)[None], attention_mask=mask)
    return logits


def _count_repeats(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = stock.repeat_kv

    def counting(x, n):
        calls.append(n)
        return real(x, n)
    monkeypatch.setattr(stock, "repeat_kv", counting)
    return calls


def test_tree_verify_keeps_grouped_queries_in_the_kernel(make_target, monkeypatch):
    """Negative control: the same model on transformers' own `sdpa` copies the KV heads
    (repeat_kv) in every layer of the masked forward."""
    target = make_target(kernels="stock")
    assert target.model.config._attn_implementation == GQA_ATTENTION
    calls = _count_repeats(monkeypatch)
    ours = _tree_forward(target)
    assert calls == []
    target.model.set_attn_implementation("sdpa")
    ref = _tree_forward(target)
    assert len(calls) == 2 * target.model.config.num_hidden_layers      # keys and values, per layer
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def test_switch_only_where_it_applies(make_target):
    target = make_target(heads=4, kv_heads=4, kernels="stock")   # no grouped queries: stays sdpa
    assert target.model.config._attn_implementation == "sdpa"
    assert not use_gqa_attention(target.model, torch.device("cpu"))
    grouped = make_target(kernels="stock")
    grouped.model.set_attn_implementation("sdpa")
    assert not use_gqa_attention(grouped.model, torch.device("cuda"))  # CUDA: masked GQA would hit the math kernel
    assert grouped.model.config._attn_implementation == "sdpa"
    assert use_gqa_attention(grouped.model, torch.device("cpu"))


@pytest.mark.parametrize("prefix", [1, 40, 200])
def test_unmasked_forwards_are_transformers_sdpa(make_target, prefix):
    """Prefill and one-token steps carry no mask: they take transformers' `sdpa` path as before."""
    target = make_target(kernels="stock")
    ids = torch.randint(3, 100, (1, prefix), generator=torch.Generator().manual_seed(prefix))
    ours, _ = target.forward(ids, target.new_cache())
    target.model.set_attn_implementation("sdpa")
    ref, _ = target.forward(ids, target.new_cache())
    assert torch.equal(ours, ref)


def test_one_switch_for_every_temporary_attention(make_target):
    """Packed batches and distill's stock-sdpa block share one reference-counted switch:
    overlapping blocks of one implementation keep it until the last ends, the model's own
    implementation comes back after, and asking for another one meanwhile is refused."""
    from hass.attention import stock_attention, switched_attention
    from hass.packed import PACKED_ATTENTION, packed_attention
    model = make_target(name="tiny-switch", kernels="stock").model
    assert model.config._attn_implementation == GQA_ATTENTION
    with packed_attention(model):
        with packed_attention(model):
            assert model.config._attn_implementation == PACKED_ATTENTION
        assert model.config._attn_implementation == PACKED_ATTENTION     # the outer block still holds it
        with pytest.raises(RuntimeError, match="switched to 'hass_packed'"):
            with stock_attention(model):
                pass
        assert model.config._attn_implementation == PACKED_ATTENTION
    assert model.config._attn_implementation == GQA_ATTENTION
    with stock_attention(model):
        assert model.config._attn_implementation == "sdpa"
    assert model.config._attn_implementation == GQA_ATTENTION
    with pytest.raises(ValueError):
        with switched_attention(model, "sdpa"):
            raise ValueError("a failing block")
    assert model.config._attn_implementation == GQA_ATTENTION           # restored on errors too
    model.set_attn_implementation("eager")
    with stock_attention(model):                                         # a stock implementation is kept
        assert model.config._attn_implementation == "eager"
    model.set_attn_implementation(GQA_ATTENTION)


def test_the_switch_gives_a_rows_target_its_attention_back(make_target):
    from hass.attention import ROWS_ATTENTION
    from hass.packed import PACKED_ATTENTION, packed_attention
    from hass.rowkernel import rows_unavailable
    if rows_unavailable() is not None:
        pytest.skip(f"the rows kernel cannot run here: {rows_unavailable()}")
    model = make_target(name="tiny-switch-rows", kernels="rows").model
    assert model.config._attn_implementation == ROWS_ATTENTION
    with packed_attention(model):
        assert model.config._attn_implementation == PACKED_ATTENTION
    assert model.config._attn_implementation == ROWS_ATTENTION
