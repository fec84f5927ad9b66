"""How good is a draft: held-out top-1 accuracy per alignment pass, and tau on the eval sets."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .decode import GenerationConfig, speculative_generate
from .draft import DraftHead, OutputHead
from .evalsets import load_set
from .events import summarize
from .losses import aligned_forward, shift_level
from .target import Target
from .tree import TreeConfig
from .verify import SamplingConfig

log = logging.getLogger(__name__)


@torch.inference_mode()
def heldout_accuracy(draft: DraftHead, target: Target, data_dir: str, align_steps: int = 3,
                     max_dialogues: int = 64, batch_size: int = 4) -> dict:
    """Top-1 agreement of the draft with the target's argmax (full vocabulary) per pass.

    Pass j sees its own features for the last j-1 positions, as at decode depth j.
    """
    from .data import FeatureDataset, collate

    ds = FeatureDataset(data_dir)
    n = min(len(ds), max_dialogues)
    if n == 0:
        raise ValueError(f"{data_dir} holds no prepared dialogues")
    dev, dt = target.device, next(draft.parameters()).dtype
    head = OutputHead(target.lm_head, draft.token_map, dtype=dt)
    hits = [0] * align_steps
    total = 0
    for start in range(0, n, batch_size):
        batch = collate([ds[i] for i in range(start, min(n, start + batch_size))], ds.pad_id)
        ids = batch["input_ids"].to(dev)
        stored = batch["features"].to(dev)
        feats = stored.to(dt)                   # the draft's precision (bf16 on some CPUs)
        valid = batch["attention_mask"].bool().to(dev)[:, 1:]
        mask = batch["loss_mask"].bool().to(dev)[:, 1:] & valid
        emb = target.embed_tokens(ids[:, 1:]).to(dt)
        f_in = feats[:, :-1]
        want = target.lm_head(stored[:, 1:][mask].to(target.dtype)).argmax(-1)   # the target's own choice
        pos = torch.arange(f_in.shape[1], device=dev)[None].expand(ids.shape[0], -1)
        levels = [f_in]
        for j in range(align_steps):
            pred = aligned_forward(draft, emb, levels, pos, valid)
            got = head.to_target(head.logits(pred[mask]).argmax(-1))
            hits[j] += int((got == want).sum())
            levels.append(shift_level(pred, f_in))
        total += int(mask.sum())
    return {"dialogues": n, "tokens": total, "accuracy_per_pass": [h / max(total, 1) for h in hits]}


@dataclass(frozen=True)
class TauResult:
    tau: float              # pooled over all cycles
    tau_macro: float        # mean of per-prompt tau
    per_depth_acceptance: list[float]
    prompts: int
    new_tokens: int
    vocab_coverage: float = 1.0   # share of the target's greedy tokens inside the draft's vocabulary


@torch.inference_mode()
def feature_agreement(target: Target, a_dir: str, b_dir: str, max_dialogues: int = 64) -> dict:
    """How far two `prepare` folders of the same dialogues differ (e.g. the target in fp32 and
    in bf16): the share of answer tokens where the target's argmax over the two folders'
    features agrees, and the mean relative L2 distance of the features themselves (answer
    positions). Training labels and draft inputs both come from these features, so this
    says how much a draft trained on one folder can see of the difference."""
    from .data import FeatureDataset
    a, b = FeatureDataset(a_dir), FeatureDataset(b_dir)
    n = min(len(a), len(b), max_dialogues)
    if n == 0:
        raise ValueError("both folders must hold prepared dialogues")
    agree = total = 0
    err = 0.0
    for i in range(n):
        x, y = a[i], b[i]
        if x["id"] != y["id"] or not torch.equal(x["input_ids"], y["input_ids"]):
            raise ValueError(f"dialogue {i} differs between the folders ({x['id']} vs {y['id']}): "
                             "prepare both from the same dialogues and settings")
        m = x["loss_mask"].bool()
        fa = x["features"][m].to(target.device, target.dtype)
        fb = y["features"][m].to(target.device, target.dtype)
        agree += int((target.lm_head(fa).argmax(-1) == target.lm_head(fb).argmax(-1)).sum())
        total += int(m.sum())
        err += float(((fa - fb).float().norm(dim=-1) / fa.float().norm(dim=-1).clamp(min=1e-6)).sum())
    return {"dtypes": [d.meta.get("target_dtype", "float32") for d in (a, b)],   # absent = fp32 (see prepare)
            "dialogues": n, "tokens": total, "argmax_agreement": agree / max(total, 1),
            "feature_relative_error": err / max(total, 1)}


def vocab_coverage(draft: DraftHead, tokens: list[int]) -> float:
    """Share of `tokens` the draft can propose at all: with a reduced vocabulary (token map)
    every other token is a guaranteed miss, whatever the draft learns."""
    if draft.token_map is None or not tokens:
        return 1.0
    inside = torch.isin(torch.tensor(tokens), draft.token_map.cpu())
    return float(inside.double().mean())


def tau_on_set(target: Target, draft: DraftHead, set_name: str, limit: int, max_new_tokens: int = 128,
               tree: TreeConfig = TreeConfig(), temperature: float = 0.0, seed: int = 0) -> TauResult:
    """Decoding of the first turn of the first `limit` questions (greedy at temperature 0,
    sampled with a fixed seed per prompt above it); acceptance statistics."""
    all_steps, macro = [], []
    for i, q in enumerate(load_set(set_name, limit)):
        cfg = GenerationConfig(max_new_tokens=max_new_tokens, tree=tree,
                               sampling=SamplingConfig(temperature=temperature), seed=seed + i)
        ids = target.render([{"role": "user", "content": q.turns[0]}])
        steps = list(speculative_generate(target, draft, ids, cfg))
        all_steps.extend(steps)
        macro.append(summarize(steps).tau)
    s = summarize(all_steps)
    tokens = [t for st in all_steps for t in st.new_tokens]
    return TauResult(s.tau, sum(macro) / max(len(macro), 1), s.per_depth_acceptance, len(macro), s.new_tokens,
                     vocab_coverage(draft, tokens))


def training_curve(target: Target, run_dir: str, sets: list[str], questions: int, max_new_tokens: int,
                   tree: TreeConfig, heldout: str | None = None, align_steps: int = 3,
                   only: list[str] | None = None, done: list[dict] | None = None,
                   on_row=None) -> list[dict]:
    """tau (and held-out accuracy) of every snapshot a `train --snapshots` run kept, in step
    order, so the next run can be planned from how tau grew with training time.

    `only` picks snapshots by name; rows in `done` (an earlier, interrupted call) are kept
    and not measured again; `on_row` sees every row as it is measured (to save progress)."""
    import json
    from pathlib import Path

    from .draft import load_draft

    snap_root = Path(run_dir) / "snapshots"
    folders = sorted(p for p in snap_root.glob("step-*") if (p / "model.safetensors").is_file()) \
        if snap_root.is_dir() else []
    if not folders:
        raise FileNotFoundError(f"no snapshots in {snap_root} (train with --snapshots)")
    if only:
        missing = set(only) - {p.name for p in folders}
        if missing:
            raise FileNotFoundError(f"no snapshot {', '.join(sorted(missing))} in {snap_root}")
        folders = [p for p in folders if p.name in only]
    rows = [r for r in (done or []) if r["snapshot"] in {p.name for p in folders}]
    for folder in folders:
        if any(r["snapshot"] == folder.name for r in rows):
            continue
        progress = json.loads((folder / "progress.json").read_text())
        draft = load_draft(folder, target.config, target.device, target.dtype)
        row = {"snapshot": folder.name, "step": progress["step"], "epoch": round(progress["epoch"], 3),
               "loss_tokens": progress["tokens"], "minutes": round(progress["elapsed_s"] / 60, 1)}
        if heldout:
            row["heldout_accuracy"] = heldout_accuracy(draft, target, heldout, align_steps)["accuracy_per_pass"]
        taus = {s: tau_on_set(target, draft, s, questions, max_new_tokens, tree).tau for s in sets}
        row["tau"] = taus
        row["mean_tau"] = sum(taus.values()) / max(len(taus), 1)
        log.info("%s: mean tau %.3f", folder.name, row["mean_tau"])
        rows.append(row)
        rows.sort(key=lambda r: r["step"])
        if on_row:
            on_row(rows)
    return rows


def curve_table(rows: list[dict]) -> str:
    """Markdown: one line per snapshot."""
    sets = list(rows[0]["tau"]) if rows else []
    acc = rows and "heldout_accuracy" in rows[0]
    head = ["step", "epoch", "loss tokens", "minutes"] + (["held-out acc (pass 1)"] if acc else []) \
        + [f"tau {s}" for s in sets] + ["mean tau"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r["step"]), f"{r['epoch']:.2f}", str(r["loss_tokens"]), f"{r['minutes']:.1f}"]
        if acc:
            cells.append(f"{r['heldout_accuracy'][0]:.3f}")
        cells += [f"{r['tau'][s]:.3f}" for s in sets] + [f"{r['mean_tau']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
