"""The randomness of sampling at T > 0, fixed per (seed, position): coupled sampling.

Plain sampling here picks the token at sequence position t as the Gumbel-max sample
argmax_x (log p_t(x) + g_t(x)), where g_t is standard Gumbel noise drawn from a generator
seeded by (seed, t) alone. That is an exact sample of p_t, and since g_t does not depend on
the tokens before t, the sequence is distributed exactly as ancestral sampling.

Speculative decoding uses the same g_t wherever it decides the token at position t: the
target's choice after a tree node (`hass.verify.coupled_choice`), and the draft's proposals
at that depth (`draft_perturbation`). So at T > 0 the speculative output is the plain
output for the same seed, token for token, exactly as at T = 0 (the randomness is part of
the input), and a draft that knows the target's distribution proposes the very token the
target will sample, where a deterministic top-k proposal is accepted only with the
probability mass it covers.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable

import torch

# vectors kept (positions x devices, 0.2 MB each for a 49k vocabulary, per sample): a step
# needs its tree's depth + 1 positions; an evicted one is drawn again, the same numbers
KEEP = 32


def position_seed(seed: int, position: int) -> int:
    """A 63-bit generator seed per (seed, position), well mixed (neighbouring positions and
    seeds get unrelated streams)."""
    digest = hashlib.blake2b(f"hass-noise:{int(seed)}:{int(position)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class PositionNoise:
    """Standard Gumbel noise over the target's vocabulary per position, drawn on the CPU
    (the same numbers on every device) and cached per device."""

    def __init__(self, seed: int, vocab_size: int):
        self.seed, self.vocab_size = int(seed), int(vocab_size)
        self._cache: OrderedDict[tuple[int, str], torch.Tensor] = OrderedDict()

    def at(self, position: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """g_position: [vocab] float32 on `device`."""
        key = (int(position), str(device))
        g = self._cache.get(key)
        if g is None:
            cpu = self._cache.get((int(position), "cpu"))
            if cpu is None:
                gen = torch.Generator().manual_seed(position_seed(self.seed, position))
                u = torch.rand(self.vocab_size, generator=gen).clamp_(min=torch.finfo(torch.float32).tiny)
                cpu = -(-u.log()).log()          # -log(-log U) is standard Gumbel (rand: ~6x faster than exponential_)
                self._put((int(position), "cpu"), cpu)
            g = cpu if str(device) == "cpu" else cpu.to(device)
            self._put(key, g)
        return g

    def rows(self, positions: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
        """[len(positions), vocab]: the noise of each position (a tree's nodes share few:
        each is drawn once and copied per row)."""
        return torch.stack([self.at(p, device) for p in positions.tolist()])

    def _put(self, key, value: torch.Tensor) -> None:
        self._cache[key] = value
        while len(self._cache) > KEEP:
            self._cache.popitem(last=False)


def draft_perturbation(noise: PositionNoise, temperature: float,
                       token_map: torch.Tensor | None) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """The draft's side of the coupling: its log-probs at the sampling temperature plus the
    noise the target will use at that position (over the draft's own vocabulary), turned
    back into log-probs. Its top-k are then the tokens most likely to be the target's
    sample there, and EAGLE-2's cumulative scores rank paths by the same perturbed belief.
    Only the proposals change: what is emitted is decided by the target alone."""
    def perturb(logp: torch.Tensor, position: int) -> torch.Tensor:
        g = noise.at(position, logp.device)
        if token_map is not None:
            g = g[token_map.to(logp.device)]
        return torch.log_softmax(logp / temperature + g, dim=-1)
    return perturb


__all__ = ["PositionNoise", "draft_perturbation", "position_seed"]
