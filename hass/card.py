"""Training cards: what a shipped draft was trained on, how long, and how well it drafts.

Every figure comes from files the training and evaluation commands wrote
(train_config.json, metrics.jsonl, train_state.pt, eval.json), never typed by hand.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch


def _last_metrics(folder: Path) -> dict:
    path = folder / "metrics.jsonl"
    if not path.is_file():
        return {}
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    return json.loads(lines[-1]) if lines else {}


def export_draft(src: str | Path, dst: str | Path, title: str, data_meta: dict | None = None,
                 command: str = "") -> Path:
    """Ship a trained draft: fp16 weights + config, the run's config, metrics and eval, and a card."""
    import shutil

    from .draft import _atomic_write
    from safetensors.torch import load_file, save_file

    src, dst = Path(src), Path(dst)
    # the run it started from, read before anything is written: shipping a continued draft over
    # the folder it was continued from (a new stage of the shipped draft) must not read itself
    init = json.loads((src / "train_config.json").read_text()).get("init") if (src / "train_config.json").is_file() else None
    prev = _run_record(Path(init)) if init and (Path(init) / "train_config.json").is_file() else None
    dst.mkdir(parents=True, exist_ok=True)
    state = {k: (v.half() if v.is_floating_point() else v) for k, v in load_file(str(src / "model.safetensors")).items()}
    _atomic_write(dst / "model.safetensors", lambda p: save_file(state, str(p), metadata={"format": "pt"}))
    for name in ("config.json", "train_config.json", "metrics.jsonl", "eval.json"):
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
    if (src / "train_state.pt").is_file():      # the card reads steps and wall time from it
        (dst / "train_state.json").write_text(json.dumps(_state(src)))
    if prev is not None:
        # a continued run: keep what the runs it started from were, so the card tells the whole training
        (dst / "init_run.json").write_text(json.dumps(prev, indent=1))
    elif (dst / "init_run.json").is_file():
        (dst / "init_run.json").unlink()
    return write_card(dst, title, data_meta, command)


def _run_record(folder: Path) -> dict:
    """What a run folder was (config, steps, last metrics), with the record of the run it was
    itself continued from, if it kept one (an exported draft's init_run.json)."""
    rec = {"folder": str(folder), "config": json.loads((folder / "train_config.json").read_text()),
           "state": _state(folder), "last_metrics": _last_metrics(folder)}
    if (folder / "init_run.json").is_file():
        rec["previous"] = json.loads((folder / "init_run.json").read_text())
    return rec


def _state(folder: Path) -> dict:
    """step, loss tokens and wall time of a run (from train_state.pt, or its exported json)."""
    if (folder / "train_state.json").is_file():
        return json.loads((folder / "train_state.json").read_text())
    if (folder / "train_state.pt").is_file():
        s = torch.load(folder / "train_state.pt", map_location="cpu", weights_only=True)
        return {k: s.get(k) for k in ("step", "tokens", "elapsed_s")}
    return {}


def write_card(folder: str | Path, title: str, data_meta: dict | None = None, command: str = "") -> Path:
    """Write <folder>/card.md from the run's own files."""
    folder = Path(folder)
    cfg = json.loads((folder / "train_config.json").read_text())
    last = _last_metrics(folder)
    state = _state(folder)
    ev = json.loads((folder / "eval.json").read_text()) if (folder / "eval.json").is_file() else None
    draft_cfg = json.loads((folder / "config.json").read_text())
    vocab = draft_cfg.get("hass", {}).get("draft_vocab_size") or draft_cfg.get("vocab_size")
    loss = cfg.get("loss", {})
    lines = [f"# {title}", ""]
    extra = draft_cfg.get("hass", {})
    if extra.get("target"):
        lines += [f"Serves **{extra['target']}** (identity `{extra.get('target_identity', '?')}`: its architecture "
                  "and vocabulary, so it is found however the model is loaded). Trained and measured on the "
                  f"target's **{extra.get('target_weights', 'unrecorded')}** weights only; with other weights of "
                  "the same model (e.g. the hub's original ones) the output stays exact, acceptance may differ.", ""]
    data_line = f"- data: `{cfg.get('data')}`" + (f" ({data_meta['counts']['dialogues']} dialogues, "
                                                 f"{data_meta['counts']['tokens']} tokens, "
                                                 f"{data_meta['counts']['loss_tokens']} loss tokens, "
                                                 f"max length {data_meta['max_len']})" if data_meta else "")
    if data_meta is None and (folder / "card.md").is_file():     # the prepared data is gone: keep what
        old = [ln for ln in (folder / "card.md").read_text().splitlines() if ln.startswith("- data: ")]
        data_line = old[0] if old else data_line                 # this command wrote from it before
    lines += ["## Training", "",
              data_line,
              f"- objective: n = {loss.get('align_steps')} alignment passes, top-K distillation K = "
              f"{loss.get('topk')} with weight w = {loss.get('topk_weight')}, regression {loss.get('reg_weight')}, "
              f"classification {loss.get('cls_weight')}"
              + (f", pass j weighted {loss['pass_decay']} ** (j - 1)" if loss.get("pass_decay", 1.0) != 1.0 else ""),
              f"- draft vocabulary: {vocab} tokens" + (" (most frequent trained-on tokens; token map)"
                                                      if draft_cfg.get("hass", {}).get("draft_vocab_size") else ""),
              f"- optimiser: AdamW lr {cfg.get('lr')}, betas {cfg.get('betas')}, warm-up {cfg.get('warmup_frac')}, "
              f"linear decay, clip by value {cfg.get('grad_clip_value')}, feature noise {cfg.get('noise')}, "
              f"batch {cfg.get('batch_size')} dialogues, seed {cfg.get('seed')}",
              f"- steps: {state.get('step')}, epochs: {last.get('epoch', 0):.2f}, loss tokens seen: "
              f"{state.get('tokens')}, wall time: {(state.get('elapsed_s') or 0) / 60:.1f} min",
              ]
    if last:
        accs = [f"{last[k]:.3f}" for k in sorted(k for k in last if k.startswith("acc_"))]
        lines.append(f"- last logged training top-1 accuracy per pass: {', '.join(accs)}")
    if (folder / "init_run.json").is_file():
        prev = json.loads((folder / "init_run.json").read_text())
        while prev:
            pc, ps, pl = prev["config"], prev["state"], prev.get("last_metrics", {})
            how = (f"itself continued from `{pc['init']}`" if pc.get("init") else "itself trained from random weights")
            if pc.get("init") and "previous" not in prev:
                how += " (no record kept)"
            lines.append(f"- continued from `{prev['folder']}` ({how}): lr {pc.get('lr')}, "
                         f"n = {pc.get('loss', {}).get('align_steps')}, {ps.get('step')} steps, "
                         f"{pl.get('epoch', 0):.2f} epochs, {ps.get('tokens')} loss tokens, "
                         f"{(ps.get('elapsed_s') or 0) / 60:.1f} min on `{pc.get('data')}`")
            prev = prev.get("previous")
    if command:
        lines += ["", "Reproduce:", "", "```bash", command, "```"]
    if ev:
        q = ev["questions_per_set"]
        first = (", ".join(f"{n} {s}" for s, n in q.items()) if isinstance(q, dict) else f"{q} per set")
        lines += ["", "## Evaluation (`python -m hass eval-draft`)", "",
                  f"Tree {ev['tree']}, T = {ev.get('temperature', 0.0):g}, first turns of the first {first} "
                  f"questions, {ev['max_new_tokens']} new tokens.", ""]
        if "heldout" in ev:
            acc = ", ".join(f"{a:.3f}" for a in ev["heldout"]["accuracy_per_pass"])
            lines.append(f"Held-out top-1 accuracy per alignment pass: {acc} "
                         f"({ev['heldout']['tokens']} tokens, {ev['heldout']['dialogues']} dialogues).")
            lines.append("")
        cov = all("vocab_coverage" in v for v in ev["sets"].values())
        lines += ["| set | tau (pooled) | tau (macro) | per-depth acceptance |" + (" target tokens in the draft "
                  "vocabulary |" if cov else ""), "|---|---|---|---|" + ("---|" if cov else "")]
        for name, v in ev["sets"].items():
            pda = " ".join(f"{a:.2f}" for a in v["per_depth_acceptance"])
            lines.append(f"| {name} | {v['tau']:.3f} | {v['tau_macro']:.3f} | {pda} |"
                         + (f" {v['vocab_coverage']:.1%} |" if cov else ""))
        lines.append(f"| mean | {ev['mean_tau']:.3f} | {ev['mean_tau_macro']:.3f} | |" + (" |" if cov else ""))
        for temp, block in ev.get("by_temperature", {}).items():
            if float(temp) == float(ev.get("temperature", 0.0)):
                continue
            lines += ["", f"At T = {float(temp):g} (sampled, seed = prompt index): mean tau {block['mean_tau']:.3f} "
                      "(" + ", ".join(f"{n} {v['tau']:.3f}" for n, v in block["sets"].items()) + ")."]
    path = folder / "card.md"
    path.write_text("\n".join(lines) + "\n")
    return path
