"""HASS training objective: EAGLE losses, top-K distillation and harmonized context alignment.

Sequences are handled as P = L - 1 *pairs*: pair t feeds (f_t, x_{t+1}) and is trained to
predict f_{t+1} (regression) and the target's next-token distribution
p_t = softmax(lm_head(f_{t+1})). See method.md section 2.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .draft import DraftHead


@dataclass(frozen=True)
class LossConfig:
    align_steps: int = 3        # n: passes of context alignment (1 = plain EAGLE)
    topk: int = 10              # K of the top-K distillation term
    topk_weight: float = 1.0    # w (0 = EAGLE loss)
    reg_weight: float = 1.0
    cls_weight: float = 0.1
    pass_decay: float = 1.0     # pass j's loss weighs pass_decay ** (j - 1) (1 = HASS's plain sum)

    def validate(self) -> "LossConfig":
        if not 1 <= self.align_steps <= 8:
            raise ValueError(f"align_steps (n) must be between 1 and 8, got {self.align_steps}")
        if self.topk < 1:
            raise ValueError(f"topk (K) must be >= 1, got {self.topk}")
        for name in ("topk_weight", "reg_weight", "cls_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if not 0 <= self.pass_decay <= 1:
            raise ValueError(f"pass_decay must be in [0, 1], got {self.pass_decay}")
        return self


def alignment_mask(length: int, levels: int, device: torch.device | None = None) -> torch.Tensor:
    """[P, levels * P] bool: which keys query row t may attend in pass `levels`.

    Level-0 (target) keys at columns c <= t - (s-1); the level-i key (i = 1..s-1) at exactly
    column c = t - (s-1) + i. With levels = 1 this is the causal mask.
    """
    s = levels
    t = torch.arange(length, device=device)[:, None]
    c = torch.arange(length, device=device)[None, :]
    blocks = [c <= t - (s - 1)]
    for i in range(1, s):
        blocks.append(c == t - (s - 1) + i)
    return torch.cat(blocks, dim=1)


def aligned_forward(draft: DraftHead, token_embeds: torch.Tensor, levels: list[torch.Tensor],
                    position_ids: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """One alignment pass: queries and residual from the newest level, keys/values from all.

    token_embeds, levels[i]: [B, P, H]; valid: [B, P] bool (False = padding). Padding keys are
    hidden from every query; a query always sees its own key, so no row is fully masked.
    """
    attn = draft.layer.self_attn
    xs = [draft.fuse(level, token_embeds) for level in levels]
    cos, sin = draft.rotary(xs[-1], position_ids)
    kvs = [attn.project_kv(x, cos, sin) for x in xs]
    k = torch.cat([kv[0] for kv in kvs], dim=2)
    v = torch.cat([kv[1] for kv in kvs], dim=2)
    p = token_embeds.shape[1]
    allowed = alignment_mask(p, len(levels), token_embeds.device)[None, None]
    if valid is not None:
        keys_ok = valid.repeat(1, len(levels))[:, None, None, :]
        own = torch.zeros_like(allowed)
        own[..., :, (len(levels) - 1) * p:] = torch.eye(p, dtype=torch.bool, device=token_embeds.device)
        allowed = (allowed & keys_ok) | own
    mask = torch.zeros(allowed.shape, dtype=xs[-1].dtype, device=xs[-1].device)
    mask = mask.masked_fill(~allowed, float("-inf"))
    return draft.layer.finish(xs[-1], attn.attend(xs[-1], cos, sin, k, v, mask))


@dataclass
class PassLoss:
    total: torch.Tensor
    reg: torch.Tensor
    cls: torch.Tensor
    topk: torch.Tensor
    acc: torch.Tensor          # top-1 agreement with the target's argmax on masked pairs
    count: int


def pass_loss(pred: torch.Tensor, target_feat: torch.Tensor, target_logp: torch.Tensor, mask: torch.Tensor,
              logits_fn, cfg: LossConfig) -> PassLoss:
    """L_step = reg * SmoothL1 + cls * CE(p, q) + w * top-K CE, averaged over masked pairs.

    pred/target_feat: [B, P, H]; target_logp: [N, V] log p_t of the N masked pairs (in mask
    order, computed once per batch without gradient, over the draft's vocabulary);
    logits_fn: features -> draft logits (the frozen lm_head, or its token-map rows).
    """
    sel = mask.bool()
    n = int(sel.sum())
    if n == 0:
        z = pred.sum() * 0.0
        return PassLoss(z, z, z, z, z.detach(), 0)
    pr = pred[sel]
    reg = F.smooth_l1_loss(pr.float(), target_feat[sel].float(), reduction="none").mean(-1).mean()
    logq = torch.log_softmax(logits_fn(pr).float(), dim=-1)
    p = target_logp.exp()
    cls = -(p * logq).sum(-1).mean()
    topv, topi = target_logp.topk(cfg.topk, dim=-1)
    topk = -(topv.exp() * logq.gather(-1, topi)).sum(-1).mean()
    total = cfg.reg_weight * reg + cfg.cls_weight * cls + cfg.topk_weight * topk
    acc = (logq.argmax(-1) == topi[:, 0]).float().mean().detach()
    return PassLoss(total, reg, cls, topk, acc, n)


def shift_level(pred: torch.Tensor, level0: torch.Tensor) -> torch.Tensor:
    """Next level = the pass's predictions shifted right by one (f_0 first), detached."""
    return torch.cat((level0[:, :1], pred[:, :-1].detach()), dim=1)
