"""How many tree nodes to verify, chosen per step for the machine at hand.

A verify forward over N nodes costs c(N) seconds here (`CostModel`: the curve measured once
per device / threads / kernels / dtype / model and cached, rescaled online by the verify
times actually seen, which follow the context as it grows and the machine's load). Node i
is on the accepted path with probability v_i (`Calibrator`: the draft's cumulative
probability and the node's place on the lookup chain, mapped to what was actually
accepted, learned online from every verified tree). A tree made of the n best nodes yields
E(n) = 1 + v_(1) + ... + v_(n) tokens in expectation (at most one node per depth is on the
path, so the expectations add), and the step takes t_draft + c(n + 1). `Fitter.select`
keeps the n that maximises E(n) / (t_draft + c(n + 1)): expected tokens per second.

With an explicit `total_tokens` the cut is fixed instead (EAGLE-2: the best total - 1),
and without lookup nodes the order is exactly EAGLE-2's (v is monotone in the draft
score, ties broken by the score itself).
"""
from __future__ import annotations

import json
import logging
import os
from bisect import bisect_left
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .candidates import DRAFT, LOOKUP, Growth, Pool
from .tree import best

log = logging.getLogger(__name__)

# draft log-prob bin edges (descending): bin b holds scores in (EDGES[b], EDGES[b-1]]
DRAFT_EDGES = (-0.05, -0.15, -0.3, -0.5, -0.8, -1.2, -1.7, -2.3, -3.0, -4.0, -5.5, -8.0)
COST_SIZES = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64)
COST_PREFIX = 128
TABLE_SIZE = 256          # node counts whose verify cost `CostModel` keeps tabulated


class Calibrator:
    """P(node on the accepted path), per draft-score bin and per lookup-chain place, from
    counts seen so far. Monotone by construction: a lower score or a deeper lookup place
    never gets a higher value.

    Draft nodes: per score bin, a Beta prior centred on the draft's own probability, worth
    `prior` observations. Lookup nodes: a chain either copies (and then goes on copying) or
    not, so place j is valued as r_1 r_2 ... r_j, the product of continuation rates
    r_j = P(place j accepted | place j - 1 accepted). A place never tried borrows the pooled
    rate of all places past the first; per place rates would leave the places past the cut
    at their prior for good (a cut that never verifies place 4 never learns that place 4
    pays, which kept copy runs at three tokens a step). The bonus token also tells, for free,
    whether the first unverified place would have been accepted (`update`)."""

    def __init__(self, prior: float = 4.0, max_lookup: int = 64):
        edges = torch.tensor(DRAFT_EDGES, dtype=torch.float64)
        upper = torch.cat((torch.zeros(1, dtype=torch.float64), edges))
        lower = torch.cat((edges, edges[-1:] - 4.0))
        self._neg_edges = [-e for e in DRAFT_EDGES]          # ascending: bisect_left is bucketize(right=False)
        self.d_prior = ((upper + lower) / 2).exp()
        self._d_prior = self.d_prior.tolist()
        # the counts, as plain floats: a step adds a handful, and a tensor op on one entry
        # costs more than the arithmetic (the tensor properties below are for reading)
        self._d_off = [0.0] * len(self._d_prior)
        self._d_acc = [0.0] * len(self._d_prior)
        self._l_tried = [0.0] * (max_lookup + 1)     # place j reached with j - 1 accepted
        self._l_hit = [0.0] * (max_lookup + 1)       # ... and j accepted
        self.prior = prior
        self._tables: tuple[list[float], list[float]] | None = None    # (draft rates, lookup values) until the next count

    d_off = property(lambda self: torch.tensor(self._d_off, dtype=torch.float64))
    d_acc = property(lambda self: torch.tensor(self._d_acc, dtype=torch.float64))
    l_tried = property(lambda self: torch.tensor(self._l_tried, dtype=torch.float64))
    l_hit = property(lambda self: torch.tensor(self._l_hit, dtype=torch.float64))

    def _bin(self, score: float) -> int:
        return bisect_left(self._neg_edges, -score)

    def _rates(self) -> list[float]:
        out, low = [], float("inf")
        for acc, off, prior in zip(self._d_acc, self._d_off, self._d_prior):
            low = min(low, (acc + self.prior * prior) / (off + self.prior))     # monotone: a running minimum
            out.append(low)
        return out

    def _cached(self) -> tuple[list[float], list[float]]:
        """The per-bin draft rates and the per-place lookup values, computed once per count
        (a step asks for them several times: every growth decision and the cut)."""
        if self._tables is None:
            self._tables = (self._rates(), self._lookup_values())
        return self._tables

    def draft_values(self, score: torch.Tensor) -> torch.Tensor:
        """v of draft nodes with these cumulative scores (float64, CPU)."""
        return torch.tensor(self.draft_value_list(score.tolist()), dtype=torch.float64)

    def lookup_values(self) -> torch.Tensor:
        """v per lookup place 1, 2, ..: the cumulative product of the continuation rates
        (each a Beta estimate centred on 1/2 for the first place and on the pooled rate of
        the deeper places for the others)."""
        return torch.tensor(self._cached()[1], dtype=torch.float64)

    def _lookup_values(self) -> list[float]:
        tried, hit, prior = self._l_tried, self._l_hit, self.prior
        deep = (sum(hit[1:]) + prior * 0.5) / (sum(tried[1:]) + prior)     # whole counts: exact in any order
        out, value = [], 1.0
        for j, (t, h) in enumerate(zip(tried, hit)):
            value *= (h + prior * (0.5 if j == 0 else deep)) / (t + prior)
            out.append(value)
        return out

    def draft_value_list(self, scores: list[float]) -> list[float]:
        """`draft_values` for plain floats."""
        rates = self._cached()[0]
        return [rates[self._bin(x)] for x in scores]

    def value_list(self, pool: Pool) -> list[float]:
        """v per candidate, capped so a child never exceeds its parent (indices are
        topological: a parent is capped before its children)."""
        rates, places = self._cached()
        last = len(places)
        v: list[float] = []
        for o, x, p, j in zip(pool.origin.tolist(), pool.score.tolist(), pool.parents.tolist(),
                              pool.lookup_depth.tolist()):
            value = rates[self._bin(x)] if o & DRAFT else 0.0
            if o & LOOKUP:
                value = max(value, places[min(max(j, 1), last) - 1])
            if p >= 0 and v[p] < value:
                value = v[p]
            v.append(value)
        return v

    def values(self, pool: Pool) -> torch.Tensor:
        """v per candidate (float64, CPU), capped so a child never exceeds its parent."""
        return torch.tensor(self.value_list(pool), dtype=torch.float64)

    def update(self, pool: Pool, chosen: torch.Tensor, on_path: torch.Tensor, bonus: int | None = None) -> None:
        """Count the verified candidates (`chosen`, pool indices) and which were accepted.

        With the `bonus` token: when the path ends at a node none of whose children was
        verified, the bonus is drawn from the target's own distribution there (its argmax
        at T = 0), so it equals an unverified lookup child x with exactly the probability
        that x would have been accepted: one more observation, one place past the cut."""
        self._tables = None
        origin, score = pool.origin.tolist(), pool.score.tolist()
        parents, places = pool.parents.tolist(), pool.lookup_depth.tolist()
        chosen, hit = chosen.tolist(), on_path.bool().tolist()
        accepted = {-1} | {c for c, h in zip(chosen, hit) if h}        # the root and the path
        for c, h in zip(chosen, hit):
            if origin[c] & DRAFT:
                b = self._bin(score[c])
                self._d_off[b] += 1.0
                self._d_acc[b] += float(h)
            if origin[c] & LOOKUP and parents[c] in accepted:   # a lookup place reached: its parent was accepted
                self._count_lookup(places[c], h)
        if bonus is None:
            return
        end = max(accepted)                        # the path's last node (indices are topological)
        if any(parents[c] == end for c in chosen):
            return                                 # the bonus came from a residual: not the plain draw
        for i, (p, o) in enumerate(zip(parents, origin)):
            if p == end and o & LOOKUP:
                self._count_lookup(places[i], int(pool.tokens[i]) == bonus)
                break

    def _count_lookup(self, place: int, hit: bool) -> None:
        self._tables = None
        j = min(max(int(place), 1), len(self._l_tried)) - 1
        self._l_tried[j] += 1.0
        self._l_hit[j] += float(hit)


@dataclass
class CostModel:
    """Seconds of a verify forward over n nodes: the measured curve times an online scale,
    and the seconds of one draft depth past the first (a draft forward), both followed
    with moving averages."""

    curve: dict[int, float]
    scale: float = 1.0
    level_s: float | None = None
    alpha: float = 0.2

    def __post_init__(self) -> None:
        self._n = torch.tensor(sorted(self.curve), dtype=torch.float64)
        self._t = torch.tensor([self.curve[k] for k in sorted(self.curve)], dtype=torch.float64)
        # the curve at every whole node count a tree can have: steps look sizes up many times
        self._table = self._interpolate(torch.arange(TABLE_SIZE + 1, dtype=torch.float64))
        self._table_list = self._table.tolist()

    def _interpolate(self, n: torch.Tensor) -> torch.Tensor:
        xs, ys = self._n, self._t
        if xs.numel() == 1:
            return ys[0] * n / xs[0]
        i = torch.searchsorted(xs, n.clamp(min=float(xs[0]))).clamp(1, xs.numel() - 1)
        x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
        return (y0 + (n - x0) * (y1 - y0) / (x1 - x0)).clamp(min=float(ys[0]) * 0.5)

    def verify(self, n: torch.Tensor | int) -> torch.Tensor:
        """Interpolated (linearly; extrapolated from the last two points beyond the curve)."""
        n = torch.as_tensor(n, dtype=torch.float64)
        whole = n.long()
        if n.numel() and bool(((whole == n) & (whole >= 0) & (whole <= TABLE_SIZE)).all()):
            return self._table[whole] * self.scale
        return self._interpolate(n) * self.scale

    def at(self, n: int) -> float:
        """`verify` of one whole node count, as a float (the fitter asks for many, one by one)."""
        if 0 <= n <= TABLE_SIZE:
            return self._table_list[n] * self.scale
        return float(self._interpolate(torch.tensor(float(n), dtype=torch.float64))) * self.scale

    def observe(self, nodes: int, verify_s: float, levels: int, draft_s: float) -> None:
        if verify_s > 0:
            ratio = verify_s / (self.at(nodes) / self.scale)
            self.scale += self.alpha * (ratio - self.scale)
        if levels > 1 and draft_s > 0:        # the first depth needs no draft forward (the root's output has it)
            per = draft_s / (levels - 1)
            self.level_s = per if self.level_s is None else self.level_s + self.alpha * (per - self.level_s)


@dataclass
class Choice:
    """What `Fitter.select` decided: the pool indices kept (ascending = topological), the
    node values, the expected tokens of the step and the rule used."""

    selected: torch.Tensor
    values: torch.Tensor | None         # None for EAGLE-2's fixed cut of draft-only pools
    expected: float
    rule: str


@dataclass
class Fitter:
    """The per-step size chooser of one generation (or one batch): calibration + costs."""

    cost: CostModel
    calibrator: Calibrator = field(default_factory=Calibrator)
    max_nodes: int = 64

    def _expected(self, ranked: list[float]) -> list[float]:
        """E(n) = 1 + the sum of the n best values (`ranked`: best first), n = 0 .. m with at
        most max_nodes nodes in all (a tree of E(n) has n + 1 nodes, the root included)."""
        gains, total = [1.0], 0.0
        for v in ranked[:max(min(len(ranked), self.max_nodes - 1), 0)]:
            total += v
            gains.append(1.0 + total)
        return gains

    def frontier_width(self, growth: Growth) -> int:
        """How many frontier nodes to draft one more depth for (the best-scored ones); 0: stop.

        Now: R0 = max_n E(n) / (D + c(n + 1)) over the candidates so far (values best first;
        D: the depths drafted so far at the recent seconds per depth). Another depth costs
        `level_s` and adds children whose values add up to at most their parent's (at most
        one child is on the path), each one more node to verify; so expanding the m best
        frontier nodes adds at most S_m, their values' sum, and
        R1(m) <= max over n of (E(n) + S_m) / (D + level_s + c(n + m + 1)). The width is the
        m with the best bound, if that beats R0: where a bigger verify costs more than the
        draft's doubtful children can bring (a weak draft on a CPU whose verify cost climbs
        from 2 rows on), growth stops instead of drafting depths no tree will use, and a
        frontier node whose children could not pay for their rows is not expanded (each
        costs a row of the draft forward and of its head)."""
        cost = self.cost
        if cost.level_s is None:                  # no draft time seen yet: the whole frontier
            return int(growth.frontier.shape[0])
        cal = self.calibrator
        gains = self._expected(sorted(cal.draft_value_list(growth.all_score.tolist()), reverse=True))
        drafted = cost.level_s * max(growth.grown - 1, 0)
        best_rate = max(g / (drafted + cost.at(n + 1)) for n, g in enumerate(gains))
        extra, total = [], 0.0
        for v in sorted(cal.draft_value_list(growth.frontier_scores().tolist()), reverse=True):
            total += v
            extra.append(total)                                                # S_m, m = 1..kf
        more = drafted + cost.level_s
        after = [more + cost.at(min(k, self.max_nodes)) for k in range(len(gains) + len(extra) + 1)]
        width = 0
        for m, s in enumerate(extra, start=1):
            rate = max((g + s) / after[n + m] for n, g in enumerate(gains, 1))
            if rate > best_rate:
                best_rate, width = rate, m
        return width

    def select(self, pool: Pool, total_tokens: int | None, draft_s: float = 0.0) -> Choice:
        """The nodes to verify: the best `total_tokens - 1` (fixed), or the count that
        maximises expected tokens per second (`total_tokens` None: fitted, up to max_nodes)."""
        if total_tokens is not None and not bool(((pool.origin & LOOKUP) > 0).any()):
            # EAGLE-2's cut as published: no values needed (v is monotone in the score anyway)
            return Choice(best(pool.score, total_tokens - 1).cpu(), None, 0.0, "fixed")
        v = self.calibrator.value_list(pool)
        if not v:
            return Choice(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.float64), 1.0,
                          "fixed" if total_tokens else "fitted")
        score = pool.score.tolist()
        order = sorted(range(len(v)), key=lambda i: (-v[i], -score[i]))     # by value, ties by draft score
        if total_tokens is not None:
            n, rule = min(total_tokens - 1, len(v)), "fixed"
        else:
            best_rate, n, rule = -1.0, 0, "fitted"
            for k, g in enumerate(self._expected([v[i] for i in order])):
                rate = g / (draft_s + self.cost.at(k + 1))
                if rate > best_rate:                                          # the first of equal rates
                    best_rate, n = rate, k
        values = torch.tensor(v, dtype=torch.float64)
        sel = torch.tensor(sorted(order[:n]), dtype=torch.long)
        return Choice(sel, values, 1.0 + float(values[sel].sum()), rule)


def monotone(curve: dict[int, float]) -> dict[int, float]:
    """The closest curve (least squares) that never falls as N grows (pool-adjacent
    violators): a bigger verify cannot really be cheaper, and a dip measured under a
    changing load would make the fitter pick that size for nothing."""
    blocks: list[list[float]] = []                 # [sum, count] of merged neighbours
    for n in sorted(curve):
        blocks.append([curve[n], 1])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            total, count = blocks.pop()
            blocks[-1][0] += total
            blocks[-1][1] += count
    values = [b[0] / b[1] for b in blocks for _ in range(int(b[1]))]
    return dict(zip(sorted(curve), values))


# -- the cost curve on disk ----------------------------------------------------------------
def cost_curve_path(target) -> Path:
    from .profile import device_key
    from .target import cache_root
    key = f"{device_key(target.device, target.kernels)}__{target.name}__{str(target.dtype).removeprefix('torch.')}"
    attention = getattr(getattr(getattr(target, "model", None), "config", None), "_attn_implementation", "sdpa")
    if attention not in (None, "sdpa"):       # a curve measured on other attention kernels is another machine
        key += f"__{attention}"
    return cache_root() / "costs" / f"{key}.json"


def load_cost_curve(target, measure: bool = True) -> dict[int, float]:
    """This machine's verify cost curve for the target, made monotone (`monotone`): from the
    cache, else measured now (a few seconds) and cached (the medians as measured)."""
    path = cost_curve_path(target)
    if path.is_file():
        try:
            d = json.loads(path.read_text())
            curve = {int(k): float(v) for k, v in d["verify_s"].items()}
            if curve and all(v > 0 for v in curve.values()):
                return monotone(curve)
        except (ValueError, KeyError, TypeError, json.JSONDecodeError) as exc:
            log.warning("ignoring unreadable cost curve %s: %s", path, exc)
    if not measure:
        return {}
    from .cost import verify_costs
    prefix = min(COST_PREFIX, target.max_length - max(COST_SIZES) - 2)
    sizes = [n for n in COST_SIZES if prefix + n + 1 < target.max_length]
    log.info("measuring this machine's verify cost curve (once; cached in %s)", path)
    curve = verify_costs(target, max(prefix, 1), sizes, repeats=3)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"prefix": prefix, "verify_s": {str(k): v for k, v in curve.items()},
                               "relative": {str(k): v / curve[min(curve)] for k, v in curve.items()}}, indent=2))
    os.replace(tmp, path)
    return monotone(curve)


def make_fitter(target, max_nodes: int = 64) -> Fitter:
    return Fitter(CostModel(load_cost_curve(target)), max_nodes=max_nodes)


__all__ = ["Calibrator", "Choice", "CostModel", "Fitter", "cost_curve_path", "load_cost_curve",
           "make_fitter", "monotone"]
