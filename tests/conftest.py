"""Shared fixtures for the decoding-engine tests: tiny in-process targets and draft doubles.

Nothing here downloads or loads files: every target is a random `LlamaForCausalLM` built
in memory, so these tests run offline in seconds. Only tests/test_default_model.py loads
the real default model.
"""
from __future__ import annotations

import weakref

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from hass.attention import GQA_ATTENTION, ROWS_ATTENTION, use_attention
from hass.draft import draft_config_for, new_draft
from hass.kernels import apply_kernels
from hass.target import Target

# The models here are tiny (and even the 135M default is small): intra-op thread
# synchronisation costs more than the maths, and on a busy 2-core machine two threads make
# every forward 5-10x slower and very noisy. One thread is fast and stable. Only the
# decoding-engine test modules are pinned; other modules keep torch's default.
PINNED_MODULES = {"test_tree", "test_greedy", "test_sampling", "test_cache", "test_errors", "test_default_model"}


@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread(request):
    if request.module.__name__.rsplit(".", 1)[-1] not in PINNED_MODULES:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True, scope="session")
def _cost_curves_of_this_run(tmp_path_factory):
    """Cost curves that tests measure (fitted trees on tiny models, or the default model at
    one thread) go to a folder of this test run, never the user's cache: a curve measured
    on a loaded machine would otherwise shape the fitted trees of every later run."""
    import hass.fit as fit
    folder = tmp_path_factory.mktemp("costs")
    stock = fit.cost_curve_path
    mp = pytest.MonkeyPatch()
    mp.setattr(fit, "cost_curve_path", lambda target: folder / stock(target).name)
    yield folder
    mp.undo()


TINY_VOCAB = 128
TINY_EOS = 2
TINY_MAX_POS = 512


def build_tiny_target(vocab_size: int = TINY_VOCAB, hidden_size: int = 64, layers: int = 2, heads: int = 4,
                      kv_heads: int = 2, intermediate_size: int = 128, max_position_embeddings: int = TINY_MAX_POS,
                      eos_token_id: int = TINY_EOS, seed: int = 0, initializer_range: float = 0.2,
                      logit_scale: float = 2.0, name: str = "tiny-llama", kernels: str = "auto") -> Target:
    """A random fp32 LLaMA wrapped in `Target`, built deterministically from `seed`.

    Peakedness: with the stock initializer_range (0.02) a random model's logits are almost
    flat (std ~0.16, median top-2 gap ~0.04, 0.3% of positions with a gap below 1e-4), and
    the different fp32 reduction orders of a one-token step and a masked tree forward can
    flip such an argmax: greedy "mismatches" would then be noise, not bugs.
    initializer_range=0.2 with the lm_head scaled by `logit_scale`=2 gives logits with std
    ~3.2 and a median top-2 gap ~0.7 (smallest seen ~1e-2), orders of magnitude above the
    ~1e-6 fp32 noise, so greedy speculative output must equal plain output token for token
    (test_greedy.test_tiny_target_is_peaked_enough checks this on the generated positions).

    `kernels` as in `load_target`: 'auto' packs the linear layers for oneDNN where the library
    would, so the equality tests run the kernels users get.
    """
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=max_position_embeddings, initializer_range=initializer_range,
        rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=None, pad_token_id=None,
        eos_token_id=eos_token_id,
    )
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(torch.float32)
    with torch.no_grad():
        model.lm_head.weight.mul_(logit_scale)
    model.generation_config.eos_token_id = eos_token_id
    model.generation_config.bos_token_id = None
    model.generation_config.pad_token_id = None
    kern = apply_kernels(model, kernels, torch.device("cpu"), torch.float32)
    attention = use_attention(model, torch.device("cpu"), kern)      # as `load_target` does on a CPU
    target = Target(model=model, tokenizer=None, name=name, kernels=kern)
    assert target.eos_ids == {eos_token_id}
    assert attention == (ROWS_ATTENTION if kern == "rows" else GQA_ATTENTION if kv_heads != heads else "sdpa")
    return target


# model -> {token sequence: target feature at its last position}; runs repeat contexts a lot
_FEATURE_MEMO: "weakref.WeakKeyDictionary[nn.Module, dict[tuple, torch.Tensor]]" = weakref.WeakKeyDictionary()


class OracleDraft(nn.Module):
    """A "matched" draft test double: its output for a (feature, token) pair is the target's
    own final feature after teacher-forcing the context that pair can see.

    The real `Drafter` (extend, grow, tree masks, frontier bookkeeping) runs unchanged on
    top of it; since the drafter turns outputs into log-probs with the target's lm_head,
    the draft log-probs ARE the target's log-probs, so the drafted tree contains the
    target's greedy continuation and deep paths are accepted.

    The "KV cache" it hands back holds token ids (keys) and positions (values), so for every
    query row it can rebuild the visible token sequence from the mask exactly as a real
    attention layer would see it; a wrong tree mask or position shows up as a wrong
    sequence (the position check below fails loudly) or as lost acceptance.

    `corrupt_every=k` negates the output for about 1 in k contexts (chosen by a fixed hash
    of the visible tokens), which turns that node's children into the target's least likely
    tokens: acceptance then stops at varied depths, exercising partial paths.
    """

    def __init__(self, target: Target, first_token: int, corrupt_every: int = 0):
        super().__init__()
        self.target = target
        self.first_token = int(first_token)        # x_0 is never fed to the draft (pairs start at x_1)
        self.corrupt_every = corrupt_every
        self.config = draft_config_for(target.config)
        self.token_map = None

    def _token_ids(self, token_embeds: torch.Tensor) -> torch.Tensor:
        weight = self.target.embed_tokens.weight
        hits = (token_embeds[0][:, None, :] == weight[None]).all(-1)      # [n, V]
        if not bool((hits.sum(-1) == 1).all()):
            raise AssertionError("OracleDraft got an embedding that is not exactly one token's")
        return hits.float().argmax(-1)

    @torch.inference_mode()
    def forward(self, features, token_embeds, position_ids, past=None, mask=None):
        ids = self._token_ids(token_embeds)                                # [n]
        n = ids.shape[0]
        pos = position_ids[0].to(torch.float64).expand(n)
        k_new = ids.to(torch.float64)[None, None, :, None]
        v_new = pos[None, None, :, None]
        keys = k_new if past is None else torch.cat((past[0], k_new), 2)
        poss = v_new if past is None else torch.cat((past[1], v_new), 2)
        total = keys.shape[2]
        if mask is None:
            allowed = torch.ones(n, total, dtype=torch.bool).tril(total - n)
        else:
            allowed = mask[0, 0]
            if allowed.dtype != torch.bool:
                allowed = allowed == 0
        all_tok, all_pos = keys[0, 0, :, 0].long(), poss[0, 0, :, 0].long()
        seqs = []
        for i in range(n):
            vis = allowed[i].nonzero().flatten()
            order = vis[all_pos[vis].argsort()]
            seen = all_pos[order]
            if not torch.equal(seen, torch.arange(seen.shape[0])):
                raise AssertionError(f"draft row {i} sees positions {seen.tolist()}, expected 0..{seen.shape[0] - 1}")
            if int(seen[-1]) != int(pos[i]):
                raise AssertionError(f"draft row {i} at position {int(pos[i])} does not see itself last")
            seqs.append([self.first_token] + all_tok[order].tolist())
        memo = _FEATURE_MEMO.setdefault(self.target.model, {})
        by_len: dict[int, list[tuple]] = {}
        for s in {tuple(s) for s in seqs if tuple(s) not in memo}:
            by_len.setdefault(len(s), []).append(s)
        for group in by_len.values():
            _, feats = self.target.forward(torch.tensor(group), self.target.new_cache())
            memo.update(zip(group, feats[:, -1].clone()))
        out = torch.stack([memo[tuple(s)] for s in seqs])
        if self.corrupt_every:
            for i, s in enumerate(seqs):
                if hash(tuple(s)) % self.corrupt_every == 0:     # int tuples hash deterministically
                    out[i] = -out[i]
        return out[None], (k_new, v_new)


def collect(gen) -> tuple[list[int], list]:
    """Run a step generator to the end: (all new tokens, steps)."""
    steps = list(gen)
    return [t for s in steps for t in s.new_tokens], steps


def tv_distance(p: torch.Tensor, q: torch.Tensor) -> float:
    return 0.5 * float((p.double() - q.double()).abs().sum())


def chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor, min_expected: float = 5.0) -> float:
    """Pearson chi-square goodness of fit; categories with expected count < min_expected are
    pooled into one bin (pooled bin dropped if still tiny). Returns the p-value."""
    counts, probs = counts.double(), probs.double()
    n = float(counts.sum())
    expected = probs * n
    big = expected >= min_expected
    obs = list(counts[big].tolist())
    exp = list(expected[big].tolist())
    pooled_e = float(expected[~big].sum())
    pooled_o = float(counts[~big].sum())
    if pooled_e >= 1.0:
        obs.append(pooled_o)
        exp.append(pooled_e)
    elif pooled_o > 0:
        # mass where the target says (almost) none: a few hits on a 1e-3 cell are decisive
        if pooled_o > 3 + 10 * pooled_e:
            return 0.0
    obs_t, exp_t = torch.tensor(obs, dtype=torch.float64), torch.tensor(exp, dtype=torch.float64)
    stat = float(((obs_t - exp_t) ** 2 / exp_t).sum())
    df = len(obs) - 1
    if df <= 0:
        return 1.0
    return float(torch.special.gammaincc(torch.tensor(df / 2.0, dtype=torch.float64),
                                         torch.tensor(stat / 2.0, dtype=torch.float64)))


def random_prompts(n: int, vocab: int, min_len: int, max_len: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (n,), generator=gen).tolist()
    lengths[0], lengths[-1] = min_len, max_len                 # always cover both ends
    return [torch.randint(0, vocab, (L,), generator=gen).tolist() for L in lengths]


# -- fixtures --------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def tiny_target() -> Target:
    """vocab 128, hidden 64, 2 layers, 4 heads / 2 kv heads, 512 positions, eos = 2, fp32, sdpa (GQA kept in the kernel)."""
    return build_tiny_target()


@pytest.fixture(scope="session")
def make_target():
    """The builder itself, for tests that need another size (e.g. a tiny vocabulary)."""
    return build_tiny_target


@pytest.fixture(scope="session")
def random_draft(tiny_target):
    """A random draft head for the tiny target: exact output, almost no acceptance."""
    return new_draft(tiny_target.config, seed=0).eval()


@pytest.fixture(scope="session")
def oracle_draft():
    """Factory: oracle_draft(target, prompt_ids, corrupt_every=0) -> OracleDraft."""
    def make(target: Target, prompt: list[int], corrupt_every: int = 0) -> OracleDraft:
        return OracleDraft(target, prompt[0], corrupt_every)
    return make


@pytest.fixture(scope="session")
def run():
    """collect(generator) -> (tokens, steps)."""
    return collect


@pytest.fixture(scope="session")
def stats():
    """Distribution checks shared by the sampling tests."""
    class Stats:
        tv = staticmethod(tv_distance)
        chi2_pvalue = staticmethod(chi2_pvalue)
    return Stats


@pytest.fixture(scope="session")
def prompts():
    """Factory: prompts(n, vocab, min_len, max_len, seed) -> list of token-id lists."""
    return random_prompts


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """A random 2-layer LLaMA with the default model's tokenizer (real chat template), saved
    as a model folder, for the commands that load a target by spec (train, bench, tune)."""
    from hass.target import load_target

    default = load_target("default")
    tok = default.tokenizer
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                          eos_token_id=default.config.eos_token_id, tie_word_embeddings=True)
        model = LlamaForCausalLM(cfg)
    folder = tmp_path_factory.mktemp("tiny-target")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def make_chat_target(tiny_folder, make_target):
    """make(name, max_position_embeddings): a tiny random target with the default model's
    tokenizer and chat template (fast chats through the studio's handlers)."""
    from transformers import AutoTokenizer

    def make(name: str, max_position_embeddings: int) -> Target:
        tok = AutoTokenizer.from_pretrained(tiny_folder)
        eos = tok.convert_tokens_to_ids("<|im_end|>")
        tiny = make_target(vocab_size=len(tok), hidden_size=64, eos_token_id=eos,
                           max_position_embeddings=max_position_embeddings)
        return Target(model=tiny.model, tokenizer=tok, name=name)
    return make
