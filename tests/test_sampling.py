"""T > 0: speculative sampling must be lossless, i.e. every output token distributed exactly
as plain sampling from the target (method.md sections 3 and 5).

* `target_probs` against brute-force temperature / top-k / top-p.
* `accept_sampling` on synthetic trees, tens of thousands of draws, against the exact p,
  with deliberately wrong acceptance rules as negative controls that must FAIL the check.
* End to end on a 12-token vocabulary: the 2nd and 3rd generated tokens of
  `speculative_generate` (one seed per run) against p(x2) = sum_x1 p(x1) p(x2|x1) and
  p(x3) = sum_{x1,x2} p(x1) p(x2|x1) p(x3|x1,x2), computed by enumerating continuations
  with the target itself; plus a wrong rule patched into the decoder, which must fail.

Every check is a Pearson chi-square goodness-of-fit test (small cells pooled) with a
p-value threshold of 1e-4, on fixed seeds, so results are reproducible.
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import hass.fit as fit_mod
import hass.noise
import hass.verify
from hass.decode import GenerationConfig, plain_generate, speculative_generate
from hass.draft import new_draft
from hass.candidates import LookupConfig
from hass.tree import TreeConfig
from hass.verify import SamplingConfig, Verdict, accept_sampling, target_probs

P_MIN = 1e-4          # a correct sampler fails a single check with probability 1e-4


# -- target_probs ----------------------------------------------------------------------------------
def _softmax_list(logits: list[float], temperature: float) -> list[float]:
    m = max(logits)
    e = [math.exp((x - m) / temperature) for x in logits]
    s = sum(e)
    return [x / s for x in e]


@pytest.mark.parametrize("temperature", [0.3, 0.7, 1.0, 1.3, 4.0])
def test_target_probs_temperature(temperature):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 40, generator=gen) * 3
    p = target_probs(logits, SamplingConfig(temperature=temperature))
    assert p.dtype == torch.float32 and p.shape == logits.shape
    for r in range(5):
        torch.testing.assert_close(p[r], torch.tensor(_softmax_list(logits[r].tolist(), temperature)),
                                   atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("k", [1, 2, 3, 7, 39, 40, 100])
def test_target_probs_top_k_keeps_exactly_k(k):
    gen = torch.Generator().manual_seed(k)
    logits = torch.randn(6, 40, generator=gen) * 2            # distinct values: no ties at the k-th
    p = target_probs(logits, SamplingConfig(temperature=0.9, top_k=k))
    for r in range(6):
        row = logits[r].tolist()
        keep = sorted(range(40), key=lambda i: -row[i])[:min(k, 40)]
        assert set(p[r].nonzero().flatten().tolist()) == set(keep)
        ref = _softmax_list([row[i] for i in keep], 0.9)
        torch.testing.assert_close(p[r, keep], torch.tensor(ref), atol=1e-6, rtol=1e-5)
        assert abs(float(p[r].sum()) - 1) < 1e-5


def _top_p_reference(probs: list[float], top_p: float) -> list[int]:
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    kept, cum = [], 0.0
    for i in order:
        kept.append(i)
        cum += probs[i]
        if cum >= top_p:
            break
    return kept


@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.5, 0.8, 0.9, 0.99, 1.0])
@pytest.mark.parametrize("top_k", [0, 5])
def test_target_probs_top_p_keeps_smallest_prefix(top_p, top_k):
    gen = torch.Generator().manual_seed(int(top_p * 100) + top_k)
    logits = torch.randn(20, 30, generator=gen) * 1.5
    cfg = SamplingConfig(temperature=1.1, top_p=top_p, top_k=top_k)
    p = target_probs(logits, cfg)
    checked = 0
    for r in range(20):
        row = logits[r].tolist()
        pool = sorted(range(30), key=lambda i: -row[i])[:top_k] if top_k else list(range(30))
        base = dict(zip(pool, _softmax_list([row[i] for i in pool], 1.1)))
        full = [base.get(i, 0.0) for i in range(30)]
        if top_p == 1.0:
            keep = [i for i in range(30) if full[i] > 0]             # no filtering at all
        else:
            keep = _top_p_reference(full, top_p)
            # skip rows where a cut would sit within float error of top_p
            cums = [sum(sorted(full, reverse=True)[:m]) for m in range(1, 30)]
            if any(abs(c - top_p) < 1e-5 for c in cums):
                continue
        checked += 1
        assert set(p[r].nonzero().flatten().tolist()) == set(keep), f"row {r}"
        z = sum(full[i] for i in keep)
        torch.testing.assert_close(p[r, keep], torch.tensor([full[i] / z for i in keep]), atol=1e-6, rtol=1e-5)
    assert checked >= 15


def test_target_probs_top_p_small_keeps_argmax():
    logits = torch.tensor([[0.1, 3.0, 0.2, 2.9]])
    p = target_probs(logits, SamplingConfig(temperature=1.0, top_p=1e-6))
    assert p.tolist() == [[0.0, 1.0, 0.0, 0.0]]


# -- accept_sampling on synthetic trees ------------------------------------------------------------
V_SYN = 8
N_DRAWS = 12000


def _first_two(verdict: Verdict, tokens: list[int]) -> tuple[int, int | None, int | None]:
    """(first emitted token, second emitted token or None, tree node of the first token or None)."""
    emitted = [tokens[i] for i in verdict.path[1:]] + [verdict.bonus]
    node = verdict.path[1] if len(verdict.path) > 1 else None
    return emitted[0], (emitted[1] if len(emitted) > 1 else None), node


def _synthetic_tree(kind: str, probs_of):
    """Token/parent lists for a tree whose shape depends on the target distribution p."""
    gen = torch.Generator().manual_seed(5)
    root_p = probs_of(0)
    by_p = root_p.argsort(descending=True).tolist()
    if kind == "top":                 # the most likely tokens, two levels: acceptance frequent
        tokens, parents = [0], [-1]
        for tok in by_p[:3]:
            tokens.append(tok)
            parents.append(0)
        for c in (1, 2):
            for tok in probs_of(c).argsort(descending=True).tolist()[:2]:
                tokens.append(tok)
                parents.append(c)
        return tokens, parents
    if kind == "unlikely":            # least likely first: mostly rejected, bonus from the residual
        return [0] + by_p[::-1][:3], [-1, 0, 0, 0]
    if kind == "all":                 # every token is a child of the root, random order
        perm = torch.randperm(V_SYN, generator=gen).tolist()
        return [0] + perm + [by_p[0]], [-1] + [0] * V_SYN + [1]
    if kind == "chain":
        return [0, by_p[1], 3, 5, 1], [-1, 0, 1, 2, 3]
    raise ValueError(kind)


def _node_logits(n_nodes: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n_nodes, V_SYN, generator=gen) * 1.2


def _draw(accept, tokens, parents, logits, cfg, n, seed):
    gen = torch.Generator().manual_seed(seed)
    t, par = torch.tensor(tokens), torch.tensor(parents)
    firsts, seconds = [], {}
    for _ in range(n):
        v = accept(t, par, logits, cfg, gen)
        assert v.path[0] == 0 and all(parents[b] == a for a, b in zip(v.path, v.path[1:]))
        first, second, node = _first_two(v, tokens)
        firsts.append(first)
        if node is not None and second is not None:
            seconds.setdefault(node, []).append(second)
    return torch.bincount(torch.tensor(firsts), minlength=V_SYN), seconds


def _check(counts, probs, stats) -> tuple[bool, float, float]:
    pv = stats.chi2_pvalue(counts, probs)
    tv = stats.tv(counts / counts.sum(), probs)
    return pv > P_MIN, pv, tv


SYN_CASES = [
    ("top", SamplingConfig(temperature=1.0)),
    ("top", SamplingConfig(temperature=0.7, top_k=3)),
    ("unlikely", SamplingConfig(temperature=1.3)),
    ("unlikely", SamplingConfig(temperature=1.0, top_p=0.8)),
    ("all", SamplingConfig(temperature=1.0)),
    ("chain", SamplingConfig(temperature=1.0, top_p=0.8, top_k=5)),
]


@pytest.mark.parametrize("kind,cfg", SYN_CASES, ids=[f"{k}-{c.temperature}-{c.top_p}-{c.top_k}" for k, c in SYN_CASES])
def test_accept_sampling_emits_exact_target_distribution(kind, cfg, stats):
    base = _node_logits(16, seed=3)
    tokens, parents = _synthetic_tree(kind, lambda i: target_probs(base[i], cfg))
    logits = base[:len(tokens)]
    probs = target_probs(logits, cfg)
    counts, seconds = _draw(accept_sampling, tokens, parents, logits, cfg, N_DRAWS, seed=17)
    ok, pv, tv = _check(counts, probs[0], stats)
    assert ok, f"first token: p-value {pv:.2e}, TV {tv:.4f}"
    assert tv < 0.03
    # the token after an accepted draft token follows p at that node
    checked = 0
    for node, seq in seconds.items():
        if len(seq) >= 1000:
            c2 = torch.bincount(torch.tensor(seq), minlength=V_SYN)
            ok2, pv2, tv2 = _check(c2, probs[node], stats)
            assert ok2, f"second token after node {node}: p-value {pv2:.2e}, TV {tv2:.4f}"
            checked += 1
    if kind in ("top", "all", "chain"):
        assert checked >= 1
    # draft tokens outside the filtered support are never emitted
    assert int(counts[probs[0] == 0].sum()) == 0


# Deliberately wrong acceptance rules (negative controls) -----------------------------------------
def _children(parents):
    ch = {}
    for i in range(1, len(parents)):
        ch.setdefault(parents[i], []).append(i)
    return ch


def wrong_first_child_always(tokens, parents, logits, cfg, gen):
    """Greedy-style: always walk to the first child."""
    ch = _children(parents.tolist())
    node, path = 0, [0]
    while node in ch:
        node = ch[node][0]
        path.append(node)
    p = target_probs(logits[node], cfg)
    return Verdict(path, int(torch.multinomial(p, 1, generator=gen)), [])


def wrong_no_residual(tokens, parents, logits, cfg, gen):
    """Accept child x with probability p(x) but never remove rejected tokens: the bonus is
    drawn from the unmodified p (the classic 'forgot the residual' bug)."""
    probs = target_probs(logits, cfg)
    ch = _children(parents.tolist())
    toks = tokens.tolist()
    node, path = 0, [0]
    while True:
        for c in ch.get(node, []):
            if float(torch.rand((), generator=gen)) < float(probs[node, toks[c]]):
                node = c
                path.append(c)
                break
        else:
            return Verdict(path, int(torch.multinomial(probs[node], 1, generator=gen)), [])


def wrong_fake_q(tokens, parents, logits, cfg, gen):
    """Standard speculative-sampling test min(1, p/q) with a made-up draft q (uniform over the
    siblings), bonus from the unmodified p: wrong for deterministic tree proposals."""
    probs = target_probs(logits, cfg)
    ch = _children(parents.tolist())
    toks = tokens.tolist()
    node, path = 0, [0]
    while True:
        kids = ch.get(node, [])
        for c in kids:
            q = 1.0 / len(kids)
            if float(torch.rand((), generator=gen)) < min(1.0, float(probs[node, toks[c]]) / q):
                node = c
                path.append(c)
                break
        else:
            return Verdict(path, int(torch.multinomial(probs[node], 1, generator=gen)), [])


@pytest.mark.parametrize("wrong", [wrong_first_child_always, wrong_no_residual, wrong_fake_q],
                         ids=lambda f: f.__name__)
def test_wrong_acceptance_rules_fail_the_same_check(wrong, stats):
    cfg = SamplingConfig(temperature=1.0)
    base = _node_logits(16, seed=3)
    tokens, parents = _synthetic_tree("top", lambda i: target_probs(base[i], cfg))
    logits = base[:len(tokens)]
    probs = target_probs(logits, cfg)
    counts, _ = _draw(wrong, tokens, parents, logits, cfg, N_DRAWS, seed=17)
    ok, pv, tv = _check(counts, probs[0], stats)
    assert not ok, f"{wrong.__name__} passed the losslessness check (p-value {pv:.2e}, TV {tv:.4f})"
    assert tv > 0.03


# -- end to end on a tiny vocabulary ---------------------------------------------------------------
V_E2E = 12
PROMPT = [3, 7, 1, 4, 9]


@pytest.fixture(scope="module")
def small_target(make_target):
    """12-token vocabulary, unscaled lm_head: broad enough distributions to test sampling.

    Stock matmul kernels: these tests check acceptance rules in distribution, which no kernel
    changes, and oneDNN's per-call overhead on 32-wide matrices made each of their thousands
    of runs ~40 % slower (the greedy tests keep the kernels users get; test_kernels checks
    that greedy output does not depend on them)."""
    return make_target(vocab_size=V_E2E, hidden_size=32, intermediate_size=64, max_position_embeddings=64,
                       logit_scale=1.0, eos_token_id=V_E2E - 1, name="tiny-llama-v12",
                       kernels="stock")


def exact_marginals(target, prompt, cfg: SamplingConfig):
    """p(x1), p(x2), p(x3) by enumerating every continuation with the target itself."""
    V = target.vocab_size
    lg, _ = target.forward(torch.tensor([prompt]), target.new_cache())
    p1 = target_probs(lg[0, -1], cfg).double()                                          # [V]
    seq2 = torch.tensor([prompt + [a] for a in range(V)])
    lg2, _ = target.forward(seq2, target.new_cache())
    p21 = target_probs(lg2[:, -1], cfg).double()                                         # [V(x1), V(x2)]
    seq3 = torch.tensor([prompt + [a, b] for a in range(V) for b in range(V)])
    lg3, _ = target.forward(seq3, target.new_cache())
    p3c = target_probs(lg3[:, -1], cfg).double().view(V, V, V)                          # [x1, x2, x3]
    joint12 = p1[:, None] * p21
    p2 = joint12.sum(0)
    p3 = (joint12[:, :, None] * p3c).sum((0, 1))
    return p1, p2, p3, (p1, p21, p3c)


NEW_E2E = 4       # x1 from prefill; the first cycle may then accept x2 AND x3 (depth <= 2) + a bonus


def sample_runs(target, draft_for, cfg: GenerationConfig, n: int, seed0: int, accepted: list | None = None,
                reported: list | None = None, prompt: list[int] = PROMPT, origins: list | None = None):
    out = []
    for i in range(n):
        steps = list(speculative_generate(target, draft_for(), prompt, dataclasses.replace(
            cfg, max_new_tokens=NEW_E2E, seed=seed0 + i, stop_at_eos=False)))
        if origins is not None:
            origins += [s.tree.origin[j] for s in steps if s.tree for j in s.path[1:]]
        toks = [t for s in steps for t in s.new_tokens]
        assert len(toks) == NEW_E2E
        out.append(toks)
        if accepted is not None:
            accepted.append(sum(s.accepted for s in steps))
        if reported is not None:
            reported.append([p for s in steps for p in s.target_prob][:3])
    return torch.tensor(out)


E2E_CASES = [
    # (name, sampling, tree, draft kind)
    ("T0.7-oracle", SamplingConfig(temperature=0.7), TreeConfig(8, 3, 3), "oracle"),
    ("T1.3-random", SamplingConfig(temperature=1.3), TreeConfig(12, 3, 4), "random"),
    ("topp0.8-oracle", SamplingConfig(temperature=1.0, top_p=0.8), TreeConfig(10, 4, 2), "oracle"),
    ("topk3-random", SamplingConfig(temperature=1.0, top_k=3), TreeConfig(16, 3, 5), "random"),
]
N_RUNS = 1500


def _draft_factory(kind, target, oracle_draft):
    if kind == "oracle":
        return lambda: oracle_draft(target, PROMPT)
    d = new_draft(target.config, seed=1)
    return lambda: d


def _marginal_checks(samples, exact, stats):
    results = []
    for pos in (0, 1, 2):                               # x1 (prefill), x2, x3
        counts = torch.bincount(samples[:, pos], minlength=V_E2E)
        results.append((pos + 1, *_check(counts, exact[pos].float(), stats)))
    return results


@pytest.mark.parametrize("rule", ["coupled", "rejection"])
@pytest.mark.parametrize("name,sampling,tree,kind", E2E_CASES, ids=[c[0] for c in E2E_CASES])
def test_speculative_sampling_matches_exact_target_distribution(small_target, oracle_draft, stats,
                                                                name, sampling, tree, kind, rule):
    sampling = dataclasses.replace(sampling, rule=rule)
    exact = exact_marginals(small_target, PROMPT, sampling)
    assert float(exact[1].max()) < 0.9 and int((exact[1] > 0.02).sum()) >= 3   # a non-trivial target
    accepted, reported = [], []
    samples = sample_runs(small_target, _draft_factory(kind, small_target, oracle_draft),
                          GenerationConfig(sampling=sampling, tree=tree), N_RUNS, seed0=1000, accepted=accepted,
                          reported=reported)
    for pos, ok, pv, tv in _marginal_checks(samples, exact, stats):
        assert ok, f"{name}: x{pos} p-value {pv:.2e}, TV {tv:.4f}"
    # every step reports the target's (filtered) probability of the token it emitted
    p1, p21, p3c = exact[3]
    x1, x2, x3 = samples[:, 0], samples[:, 1], samples[:, 2]
    want = torch.stack((p1[x1], p21[x1, x2], p3c[x1, x2, x3]), 1).float()
    torch.testing.assert_close(torch.tensor(reported), want, atol=1e-4, rtol=1e-4)
    assert bool((want > 0).all())                      # nothing outside the top-k / top-p support
    # acceptance really happened (the check is not only about bonus tokens)
    mean_acc = sum(accepted) / len(accepted)
    assert mean_acc > (0.8 if kind == "oracle" else 0.2), f"mean accepted per run {mean_acc:.2f}"
    if sampling.top_k:
        assert set(samples[:, 0].tolist()) <= set(exact[0].nonzero().flatten().tolist())


def test_plain_sampling_matches_exact_target_distribution(small_target, stats):
    """Calibration of the check itself: plain sampling passes it."""
    sampling = SamplingConfig(temperature=1.3)
    exact = exact_marginals(small_target, PROMPT, sampling)
    out = []
    for i in range(N_RUNS):
        steps = plain_generate(small_target, PROMPT, GenerationConfig(
            max_new_tokens=NEW_E2E, sampling=sampling, seed=1000 + i, stop_at_eos=False))
        out.append([t for s in steps for t in s.new_tokens])
    for pos, ok, pv, tv in _marginal_checks(torch.tensor(out), exact, stats):
        assert ok, f"plain x{pos}: p-value {pv:.2e}, TV {tv:.4f}"


def test_wrong_rule_in_the_decoder_fails_end_to_end(small_target, oracle_draft, stats, monkeypatch):
    """Negative control end to end: the decoder with a residual-free acceptance rule must
    fail the same x2/x3 check that the real rule passes."""
    monkeypatch.setattr(hass.verify, "accept_sampling", wrong_no_residual)
    sampling = SamplingConfig(temperature=0.7, rule="rejection")
    exact = exact_marginals(small_target, PROMPT, sampling)
    samples = sample_runs(small_target, _draft_factory("oracle", small_target, oracle_draft),
                          GenerationConfig(sampling=sampling, tree=TreeConfig(8, 3, 3)), 1000, seed0=1000)
    results = _marginal_checks(samples, exact, stats)
    assert results[0][1], "x1 comes from prefill and must still be right"
    assert not results[1][1] or not results[2][1], f"wrong rule passed: {results}"


# -- lookup candidates in the tree (deterministic proposals, like the draft's top-k) --------------
PROMPT_REPEAT = [3, 7, 1, 3, 7, 2, 3, 7]       # repeated n-grams: lookup proposes at most steps
ONE_GRAM = LookupConfig(max_ngram=3, min_ngram=1, max_tokens=4)
FIXED_CURVE = {1: 1.0, 2: 1.02, 4: 1.05, 8: 1.15, 16: 1.35, 32: 1.9, 64: 3.0}     # the default model's shape here
N_RUNS_LOOKUP = 1000      # as the negative controls: enough to fail a wrong rule (below), a third cheaper
LOOKUP_CASES = [
    # (name, sampling, config): draft + lookup (fixed cut), lookup only, draft + lookup (fitted cut)
    ("T1.0-random+lookup", SamplingConfig(temperature=1.0),
     GenerationConfig(tree=TreeConfig(6, 2, 2), lookup=ONE_GRAM), "random"),
    ("T0.8-lookup-only", SamplingConfig(temperature=0.8),
     GenerationConfig(tree=TreeConfig(6, 2, 2), lookup=ONE_GRAM, draft_source=False), "random"),
    ("T1.0-oracle+lookup-fitted", SamplingConfig(temperature=1.0),
     GenerationConfig(tree=TreeConfig(16, 3, 3), lookup=ONE_GRAM, fitted=True), "oracle"),
]


def _repeat_draft_factory(kind, target, oracle_draft):
    if kind == "oracle":
        return lambda: oracle_draft(target, PROMPT_REPEAT)
    d = new_draft(target.config, seed=1)
    return lambda: d


@pytest.mark.parametrize("rule", ["coupled", "rejection"])
@pytest.mark.parametrize("name,sampling,cfg,kind", LOOKUP_CASES, ids=[c[0] for c in LOOKUP_CASES])
def test_sampling_with_lookup_nodes_matches_exact_target_distribution(small_target, oracle_draft, stats,
                                                                      name, sampling, cfg, kind, rule, monkeypatch):
    sampling = dataclasses.replace(sampling, rule=rule)
    # the fitted case's cut follows a cost curve: a fixed one (a tiny model's measured curve is
    # load noise), so the trees, and the count of lookup nodes checked below, do not depend on it
    monkeypatch.setattr(fit_mod, "load_cost_curve", lambda target, measure=True: dict(FIXED_CURVE))
    exact = exact_marginals(small_target, PROMPT_REPEAT, sampling)
    origins: list = []
    samples = sample_runs(small_target, _repeat_draft_factory(kind, small_target, oracle_draft),
                          dataclasses.replace(cfg, sampling=sampling), N_RUNS_LOOKUP, seed0=2000, prompt=PROMPT_REPEAT,
                          origins=origins)
    for pos, ok, pv, tv in _marginal_checks(samples, exact, stats):
        assert ok, f"{name}: x{pos} p-value {pv:.2e}, TV {tv:.4f}"
    # lookup nodes were really verified and accepted (the check covers them)
    assert origins.count("lookup") + origins.count("both") > 30, f"lookup accepted too rarely: {len(origins)}"
    if not cfg.draft_source:
        assert set(origins) <= {"lookup"}


def test_wrong_rule_with_lookup_nodes_fails_end_to_end(small_target, stats, monkeypatch):
    """Negative control for trees made of lookup nodes only: the residual-free rule fails."""
    monkeypatch.setattr(hass.verify, "accept_sampling", wrong_no_residual)
    sampling = SamplingConfig(temperature=0.8, rule="rejection")
    exact = exact_marginals(small_target, PROMPT_REPEAT, sampling)
    cfg = GenerationConfig(sampling=sampling, tree=TreeConfig(6, 2, 2), lookup=ONE_GRAM, draft_source=False)
    samples = sample_runs(small_target, _repeat_draft_factory("random", small_target, None), cfg, 2500,
                          seed0=2000, prompt=PROMPT_REPEAT)
    results = _marginal_checks(samples, exact, stats)
    assert results[0][1], "x1 comes from prefill and must still be right"
    assert not results[1][1] or not results[2][1], f"wrong rule passed: {results}"


# -- coupled sampling: plain sampling's very tokens -----------------------------------------------
COUPLED_CASES = [
    # (name, sampling, config, draft kind, prompt)
    ("T0.7-oracle", SamplingConfig(temperature=0.7), GenerationConfig(tree=TreeConfig(8, 3, 3)), "oracle", PROMPT),
    ("T1.3-random", SamplingConfig(temperature=1.3), GenerationConfig(tree=TreeConfig(12, 3, 4)), "random", PROMPT),
    ("topp-topk-oracle+lookup-fitted", SamplingConfig(temperature=1.0, top_p=0.8, top_k=5),
     GenerationConfig(tree=TreeConfig(16, 3, 3), lookup=ONE_GRAM, fitted=True), "oracle", PROMPT_REPEAT),
    ("T0.8-lookup-only", SamplingConfig(temperature=0.8),
     GenerationConfig(tree=TreeConfig(6, 2, 2), lookup=ONE_GRAM, draft_source=False), "random", PROMPT_REPEAT),
]
N_COUPLED = 30
NEW_COUPLED = 24


def _tokens(steps) -> list[int]:
    return [t for s in steps for t in s.new_tokens]


def _equal_runs(target, draft_for, sampling, cfg, prompt, seeds=range(N_COUPLED)):
    """(seeds whose speculative tokens equal plain sampling's, accepted draft/lookup tokens)."""
    equal, accepted = 0, 0
    for seed in seeds:
        c = dataclasses.replace(cfg, sampling=sampling, seed=seed, max_new_tokens=NEW_COUPLED, stop_at_eos=False)
        plain = _tokens(plain_generate(target, prompt, c))
        spec = list(speculative_generate(target, draft_for(), prompt, c))
        equal += _tokens(spec) == plain
        accepted += sum(s.accepted for s in spec)
        for s in spec:          # the event's target choice after the path is the token emitted there
            if s.kind == "speculative" and len(s.new_tokens) == len(s.path) and c.sampling.coupled:
                assert s.target_choice[s.path[-1]] == s.new_tokens[-1]
    return equal, accepted


@pytest.mark.parametrize("name,sampling,cfg,kind,prompt", COUPLED_CASES, ids=[c[0] for c in COUPLED_CASES])
def test_coupled_sampling_emits_plain_sampling_tokens(small_target, oracle_draft, name, sampling, cfg, kind, prompt,
                                                      monkeypatch):
    """At T > 0 the coupled rule is exact in the strongest sense: for every seed, the very
    tokens plain sampling draws (the distribution checks above show those are samples of the
    target), whatever the draft, the lookup nodes and the fitted cut."""
    monkeypatch.setattr(fit_mod, "load_cost_curve", lambda target, measure=True: dict(FIXED_CURVE))
    factory = _repeat_draft_factory if prompt is PROMPT_REPEAT else _draft_factory
    equal, accepted = _equal_runs(small_target, factory(kind, small_target, oracle_draft), sampling, cfg, prompt)
    assert equal == N_COUPLED, f"{name}: {N_COUPLED - equal} of {N_COUPLED} seeds differ from plain sampling"
    assert accepted > N_COUPLED * (8 if kind == "oracle" else 1), f"{name}: too little accepted ({accepted})"


REAL_ACCEPT_COUPLED = hass.verify.accept_coupled


def wrong_coupled_noise_one_early(tokens, parents, depths, anc, logits, cfg, noise, start):
    """Verification drawing each choice with the noise of the position before it."""
    return REAL_ACCEPT_COUPLED(tokens, parents, depths, anc, logits, cfg, noise, start - 1)


def test_equality_check_fails_for_rules_that_do_not_couple(small_target, oracle_draft, monkeypatch):
    """Negative controls of the equality check: the rejection rule (right in distribution,
    not coupled) and a coupled rule reading the wrong position's noise both break token
    equality."""
    sampling = SamplingConfig(temperature=1.3)
    draft_for = _draft_factory("random", small_target, oracle_draft)
    cfg = GenerationConfig(tree=TreeConfig(12, 3, 4))
    equal, _ = _equal_runs(small_target, draft_for, dataclasses.replace(sampling, rule="rejection"), cfg, PROMPT)
    assert equal < N_COUPLED // 2, f"the rejection rule matched plain sampling on {equal} of {N_COUPLED} seeds"

    monkeypatch.setattr(hass.verify, "accept_coupled", wrong_coupled_noise_one_early)
    equal, _ = _equal_runs(small_target, draft_for, sampling, cfg, PROMPT)
    assert equal < N_COUPLED // 2, f"the wrong noise position matched plain sampling on {equal} of {N_COUPLED} seeds"


def test_plain_sampling_needs_fresh_noise_per_position(small_target, stats, monkeypatch):
    """Negative control of the sampler itself: one noise vector for every position (keyed by
    the seed alone) makes the tokens depend on each other, and the marginals fail."""
    real = hass.noise.position_seed
    monkeypatch.setattr(hass.noise, "position_seed", lambda seed, position: real(seed, 0))
    sampling = SamplingConfig(temperature=1.3)
    exact = exact_marginals(small_target, PROMPT, sampling)
    out = [_tokens(plain_generate(small_target, PROMPT, GenerationConfig(
        max_new_tokens=NEW_E2E, sampling=sampling, seed=1000 + i, stop_at_eos=False))) for i in range(1000)]
    results = _marginal_checks(torch.tensor(out), exact, stats)
    assert results[0][1], "x1 alone is still a Gumbel-max sample"
    assert not results[1][1] or not results[2][1], f"shared noise passed: {results}"


def test_coupled_draft_proposes_the_targets_sample(small_target, oracle_draft):
    """The draft side reads the noise of the position it proposes for: a draft that knows
    the target's distribution (the oracle) then proposes the token the target will sample,
    and nearly every step accepts a full-depth path, far more than the rejection rule gets
    from the same draft with the same trees."""
    draft_for = _draft_factory("oracle", small_target, oracle_draft)
    cfg = GenerationConfig(tree=TreeConfig(8, 3, 3))
    per_rule = {}
    for rule in ("coupled", "rejection"):
        steps = [s for seed in range(20) for s in speculative_generate(small_target, draft_for(), PROMPT, dataclasses.replace(
            cfg, sampling=SamplingConfig(temperature=1.0, rule=rule), seed=seed, max_new_tokens=NEW_COUPLED,
            stop_at_eos=False)) if s.kind == "speculative"]
        full = [s.accepted == max(s.tree.depths) for s in steps]
        per_rule[rule] = (sum(full) / len(full), sum(s.accepted for s in steps) / len(steps))
    assert per_rule["coupled"][0] > 0.9, per_rule
    assert per_rule["coupled"][1] > per_rule["rejection"][1] + 0.5, per_rule


def test_position_noise_depends_on_seed_and_position_only():
    """The noise of a position is the same whatever was drawn before it and whether it was
    evicted from the cache (plain decoding asks position by position, verification a tree's
    positions per step, a batch sample by sample); other seeds and positions differ."""
    a, b = hass.noise.PositionNoise(3, 50), hass.noise.PositionNoise(3, 50)
    first = a.at(7).clone()
    for p in range(hass.noise.KEEP + 10):            # evicts position 7 from a's cache
        b.at(p)
        a.at(1000 + p)
    torch.testing.assert_close(a.at(7), first, rtol=0, atol=0)
    torch.testing.assert_close(b.at(7), first, rtol=0, atol=0)
    assert not torch.equal(a.at(8), first)
    assert not torch.equal(hass.noise.PositionNoise(4, 50).at(7), first)
