"""HASS context alignment and losses against slow, obvious references."""
import pytest
import torch
from transformers import LlamaConfig

from hass.draft import new_draft
from hass.losses import LossConfig, aligned_forward, alignment_mask, pass_loss, shift_level

H = 32


@pytest.fixture(scope="module")
def draft():
    cfg = LlamaConfig(vocab_size=50, hidden_size=H, intermediate_size=64, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    d = new_draft(cfg, seed=1).double()
    with torch.no_grad():            # larger weights so a wrong mask changes outputs visibly
        for p in d.parameters():
            p.mul_(5.0)
    return d


def test_mask_matches_worked_example():
    # method.md: L = 5, pass 3; T = level 0, 1/2 = draft levels
    expected = ["2....", "12...", "T12..", "TT12.", "TTT12"]
    m = alignment_mask(5, 3)
    for t, row in enumerate(expected):
        got = ""
        for c in range(5):
            marks = [lvl for lvl, name in enumerate("T12") if m[t, lvl * 5 + c]]
            assert len(marks) <= 1
            got += "T12"[marks[0]] if marks else "."
        assert got == row


def test_one_level_is_causal():
    assert torch.equal(alignment_mask(7, 1), torch.ones(7, 7, dtype=torch.bool).tril())


def _reference_row(draft, emb, f0, t, s, valid_len):
    """Decode-time semantics: target features up to pair v = t-(s-1), then the draft's own
    (detached) outputs fed back pair by pair up to pair t. Runs with the draft's KV cache."""
    v = t - (s - 1)
    kv = None
    prev = None
    for c in range(t + 1):
        feat = f0[:, c:c + 1] if (c <= max(v, 0)) else prev.detach()
        pos = torch.tensor([[c]])
        out, new = draft(feat, emb[:, c:c + 1], pos, kv)
        kv = new if kv is None else (torch.cat((kv[0], new[0]), 2), torch.cat((kv[1], new[1]), 2))
        prev = out
    return out[:, 0]


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_fast_alignment_equals_step_by_step(draft, n):
    torch.manual_seed(n)
    B, P = 2, 7
    lengths = [7, 4]                       # second sample is right-padded
    emb = torch.randn(B, P, H, dtype=torch.double)
    f0 = torch.randn(B, P, H, dtype=torch.double)
    valid = torch.tensor([[i < L for i in range(P)] for L in lengths])
    pos = torch.arange(P)[None].expand(B, -1)
    levels = [f0]
    for j in range(n):
        pred = aligned_forward(draft, emb, levels, pos, valid)
        if j + 1 < n:
            levels.append(shift_level(pred, f0))
    for b in range(B):
        for t in range(lengths[b]):
            ref = _reference_row(draft, emb[b:b + 1], f0[b:b + 1], t, n, lengths[b])
            torch.testing.assert_close(pred[b, t], ref[0], rtol=1e-9, atol=1e-9)
    # gradients of a loss on the last pass agree with the reference's
    draft.zero_grad()
    w = torch.randn(B, P, H, dtype=torch.double)
    vmask = valid[..., None].double()
    levels = [f0]
    for j in range(n):
        pred = aligned_forward(draft, emb, levels, pos, valid)
        if j + 1 < n:
            levels.append(shift_level(pred, f0))
    (pred * w * vmask).sum().backward()
    fast = {k: p.grad.clone() for k, p in draft.named_parameters()}
    draft.zero_grad()
    total = 0
    for b in range(B):
        for t in range(lengths[b]):
            total = total + (_reference_row(draft, emb[b:b + 1], f0[b:b + 1], t, n, lengths[b]) * w[b, t]).sum()
    total.backward()
    for k, p in draft.named_parameters():
        torch.testing.assert_close(fast[k], p.grad, rtol=1e-7, atol=1e-9, msg=k)
    draft.zero_grad()


def test_padding_gives_no_nan(draft):
    emb = torch.randn(1, 5, H, dtype=torch.double)
    f0 = torch.randn(1, 5, H, dtype=torch.double)
    valid = torch.tensor([[True, False, False, False, False]])
    levels = [f0, shift_level(f0, f0), shift_level(f0, f0)]
    out = aligned_forward(draft, emb, levels, torch.arange(5)[None], valid)
    assert torch.isfinite(out).all()


def test_eagle_loss_when_n1_w0():
    torch.manual_seed(0)
    lm_head = torch.nn.Linear(H, 40, bias=False)
    pred, tgt = torch.randn(2, 6, H), torch.randn(2, 6, H)
    mask = torch.rand(2, 6) > 0.3
    tlogp = torch.log_softmax(lm_head(tgt[mask]), -1)
    cfg = LossConfig(align_steps=1, topk_weight=0.0)
    pl = pass_loss(pred, tgt, tlogp, mask, lm_head, cfg)
    # EAGLE: SmoothL1 regression + 0.1 * cross-entropy against the target distribution
    reg = torch.nn.functional.smooth_l1_loss(pred[mask], tgt[mask])
    ce = -(tlogp.exp() * torch.log_softmax(lm_head(pred[mask]), -1)).sum(-1).mean()
    torch.testing.assert_close(pl.total, reg + 0.1 * ce)


def test_topk_term_by_hand():
    lm_head = torch.nn.Linear(2, 4, bias=False)
    with torch.no_grad():
        lm_head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]]))
    pred = torch.tensor([[[0.5, -0.5]]])
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    cfg = LossConfig(topk=2, topk_weight=1.0, reg_weight=0.0, cls_weight=0.0)
    pl = pass_loss(pred, pred, p.log(), torch.tensor([[True]]), lm_head, cfg)
    logits = torch.tensor([0.5, -0.5, 0.0, -0.5])
    logq = logits - torch.logsumexp(logits, 0)
    by_hand = -(0.5 * logq[0] + 0.3 * logq[1])
    torch.testing.assert_close(pl.topk, by_hand)
    torch.testing.assert_close(pl.total, by_hand)
