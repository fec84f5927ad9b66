"""Step events: the one contract between the decoder and everything that shows or measures it.

Plain data only (lists, floats, strings), so the CLI, the benchmark, the app and the plots
read the same thing and can serialise it as JSON. Aggregates are written once, here.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class DraftTree:
    """One speculative step's tree, root first, in topological order (parents before children)."""

    tokens: list[int]
    parents: list[int]      # -1 for the root
    depths: list[int]
    logp: list[float]       # cumulative draft log-prob (0 for the root)
    prob: list[float]       # draft probability of the node given its parent (1 for the root)
    origin: list[str] = field(default_factory=list)   # per node: "root" | "draft" | "lookup" | "both"
    rule: str = ""          # how the size was chosen: "fitted" (per step, for this machine) | "fixed"
    expected: float = 0.0   # tokens this step was expected to yield (calibrated), incl. the bonus
    drafted: bool = True    # whether the draft head ran this step (a fitted tree skips it when it cannot pay)

    def __len__(self) -> int:
        return len(self.tokens)

    def children(self, node: int) -> list[int]:
        return [i for i, p in enumerate(self.parents) if p == node]


@dataclass(frozen=True)
class Step:
    """One target forward and what it produced."""

    index: int
    kind: str                   # "prefill" | "speculative" | "plain"
    tree: DraftTree | None
    path: list[int]             # verified node indices, root first (speculative steps)
    accepted: int               # draft tokens accepted on the path
    new_tokens: list[int]       # accepted drafts + the target's token
    sources: list[str]          # per new token: "draft@<depth>" | "bonus" | "target"
    target_prob: list[float]    # target probability of each new token
    timings: dict[str, float]   # seconds: draft, verify, other
    position: int = 0           # tokens in the sequence before this step's new tokens
    stop_reason: str | None = None   # "eos" | "max_new_tokens" | "context" on the last step
    target_choice: list[int] = field(default_factory=list)   # per tree node: the target's next token (greedy, or its coupled sample)

    @property
    def seconds(self) -> float:
        return sum(self.timings.values())

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Summary:
    """Aggregates over a list of steps; the definitions of method.md section 3."""

    new_tokens: int = 0
    target_forwards: int = 0
    cycles: int = 0
    tau: float = 1.0
    accepted_per_depth: list[int] = field(default_factory=list)   # cycles that accepted a token at depth d (d=1..)
    reached_per_depth: list[int] = field(default_factory=list)    # cycles that tried depth d
    per_depth_acceptance: list[float] = field(default_factory=list)
    seconds: float = 0.0
    draft_s: float = 0.0
    verify_s: float = 0.0
    other_s: float = 0.0
    tokens_per_s: float = 0.0
    stop_reason: str | None = None
    offered_by_origin: dict[str, int] = field(default_factory=dict)    # tree nodes verified, per origin
    accepted_by_origin: dict[str, int] = field(default_factory=dict)   # of those, accepted
    tree_sizes: list[int] = field(default_factory=list)                # nodes verified per cycle (root incl.)

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(steps: list[Step]) -> Summary:
    """tau = mean new tokens per speculative cycle incl. the bonus (1.0 when there are none).

    Per-depth acceptance at d = P(accepted at depth d | the path reached depth d-1 and the
    tree had a child there to try).
    """
    s = Summary()
    spec_tokens = 0
    accepted: dict[int, int] = {}
    reached: dict[int, int] = {}
    for st in steps:
        s.new_tokens += len(st.new_tokens)
        s.target_forwards += 1
        s.draft_s += st.timings.get("draft", 0.0)
        s.verify_s += st.timings.get("verify", 0.0)
        s.other_s += st.timings.get("other", 0.0)
        if st.stop_reason:
            s.stop_reason = st.stop_reason
        if st.kind != "speculative" or st.tree is None:
            continue
        s.cycles += 1
        spec_tokens += len(st.new_tokens)
        s.tree_sizes.append(len(st.tree))
        on_path = set(st.path[1:])
        for i, o in enumerate(st.tree.origin[1:] if st.tree.origin else ["draft"] * (len(st.tree) - 1), start=1):
            s.offered_by_origin[o] = s.offered_by_origin.get(o, 0) + 1
            if i in on_path:
                s.accepted_by_origin[o] = s.accepted_by_origin.get(o, 0) + 1
        for d in range(1, st.accepted + 1):
            accepted[d] = accepted.get(d, 0) + 1
            reached[d] = reached.get(d, 0) + 1
        last = st.path[-1] if st.path else 0
        if st.tree.children(last):
            d = st.accepted + 1
            reached[d] = reached.get(d, 0) + 1
    s.seconds = s.draft_s + s.verify_s + s.other_s
    s.tau = spec_tokens / s.cycles if s.cycles else 1.0
    depth = max(reached, default=0)
    s.accepted_per_depth = [accepted.get(d, 0) for d in range(1, depth + 1)]
    s.reached_per_depth = [reached.get(d, 0) for d in range(1, depth + 1)]
    s.per_depth_acceptance = [a / r if r else 0.0 for a, r in zip(s.accepted_per_depth, s.reached_per_depth)]
    s.tokens_per_s = s.new_tokens / s.seconds if s.seconds > 0 else 0.0
    return s


def speedup(base_tokens: int, base_seconds: float, tokens: int, seconds: float) -> float | None:
    """The project's one speedup: tokens per second over the baseline's tokens per second.
    For the same new tokens (as lossless greedy decoding gives) it is the baseline's time over
    this time. The bench, the studio's race and its charts all call this; None without data."""
    if base_tokens <= 0 or base_seconds <= 0 or tokens <= 0 or seconds <= 0:
        return None
    return (tokens / seconds) / (base_tokens / base_seconds)
