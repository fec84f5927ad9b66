"""The draft training loop (HASS; EAGLE with align_steps=1, topk_weight=0).

Plain PyTorch with `accelerate` for devices, so `accelerate launch -m hass train ...`
trains on several GPUs unchanged. Checkpoints are written atomically in the draft format
the decoder loads, plus a resumable optimizer state.
"""
from __future__ import annotations

import json
import logging
import math
import random
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .device import cpu_has_fast_bf16, resolve_device
from .draft import DraftHead, OutputHead, _atomic_write, load_draft, new_draft, save_draft
from .losses import LossConfig, aligned_forward, pass_loss, shift_level

log = logging.getLogger(__name__)

STATE_FILE = "train_state.pt"
METRICS_FILE = "metrics.jsonl"


@dataclass
class TrainConfig:
    data: str
    out: str
    loss: LossConfig = field(default_factory=LossConfig)
    lr: float = 3e-4
    warmup_frac: float = 0.01
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    grad_clip_value: float = 0.5
    noise: float = 0.2                 # uniform noise on input features: (U - 0.5) * noise * 512 / L
    batch_size: int = 4
    epochs: float = 1.0
    max_minutes: float | None = None
    max_steps: int | None = None
    seed: int = 0
    resume: bool = False
    init: str | None = None            # start from this draft folder instead of random weights
    draft_vocab: int = 0               # > 0: restrict the draft to the N most frequent target tokens
    #                                    (with `init`: replaces the init's token map)
    vocab_data: str | None = None      # rank the token map on these dialogues' assistant turns
    #                                    ('sharegpt' or a file); None: the prepared data's loss tokens
    snapshots: bool = False            # also keep every checkpoint under <out>/snapshots/step-N (tau vs time)
    checkpoint_minutes: float = 5.0
    log_every: int = 10
    precision: str = "auto"            # fp32 | bf16 (autocast, fp32 master weights) | auto: bf16 where it is fast

    def validate(self) -> "TrainConfig":
        self.loss.validate()
        if self.lr <= 0 or self.batch_size < 1 or self.epochs <= 0:
            raise ValueError("lr, batch_size and epochs must be positive")
        if not 0 <= self.warmup_frac < 1:
            raise ValueError("warmup_frac must be in [0, 1)")
        if self.vocab_data and self.draft_vocab <= 0:
            raise ValueError("vocab_data ranks the draft's token map: give draft_vocab (the map's size) too")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision must be auto, fp32 or bf16, got {self.precision!r}")
        return self


def mixed_precision(precision: str, device: str) -> str:
    """Accelerate's mixed_precision for a TrainConfig.precision: 'auto' autocasts to bf16 on a
    CUDA GPU with bf16 and on CPUs with native bf16 (there it is several times faster than
    fp32), else trains in fp32. The weights and the optimizer stay fp32 either way."""
    if precision == "bf16":
        return "bf16"
    if precision == "fp32":
        return "no"
    dev = resolve_device(device)
    if dev.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    return "bf16" if dev.type == "cpu" and cpu_has_fast_bf16() else "no"


def _atomic_torch_save(obj, path: Path) -> None:
    _atomic_write(path, lambda p: torch.save(obj, p))


def lr_at(step: int, total: int, warmup: int, base: float) -> float:
    """Linear warm-up, then linear decay to zero."""
    if step < warmup:
        return base * (step + 1) / warmup
    return base * max(0.0, (total - step) / max(1, total - warmup))


class AlignedDraft(torch.nn.Module):
    """Wraps the draft so one alignment pass is a `forward` (what DDP/accelerate expect)."""

    def __init__(self, draft: DraftHead):
        super().__init__()
        self.draft = draft

    def forward(self, token_embeds, levels, position_ids, valid):
        return aligned_forward(self.draft, token_embeds, levels, position_ids, valid)


def train_step(model: AlignedDraft, embed: torch.nn.Module, head: OutputHead, batch: dict,
               cfg: TrainConfig, gen: torch.Generator | None, backward: Callable[[torch.Tensor], None]) -> dict:
    """Forward + backward over all alignment passes of one batch; returns per-pass metrics."""
    ids, feats = batch["input_ids"], batch["features"].float()
    valid = batch["attention_mask"].bool()
    tokens_in, f_in, target = ids[:, 1:], feats[:, :-1], feats[:, 1:]
    pair_valid = valid[:, 1:]
    mask = batch["loss_mask"][:, 1:].bool() & pair_valid
    if cfg.noise > 0:
        u = torch.rand(f_in.shape, generator=gen, device="cpu").to(f_in.device)
        f_in = f_in + (u - 0.5) * cfg.noise * 512 / f_in.shape[1]
    with torch.no_grad():
        emb = embed(tokens_in).float()
        target_logp = torch.log_softmax(head.logits(target[mask]).float(), dim=-1)
    pos = torch.arange(tokens_in.shape[1], device=ids.device)[None].expand(ids.shape[0], -1)
    levels = [f_in]
    metrics: dict = {"tokens": int(mask.sum())}
    for j in range(cfg.loss.align_steps):
        pred = model(emb, levels, pos, pair_valid)
        pl = pass_loss(pred, target, target_logp, mask, head.logits, cfg.loss)
        backward(pl.total * cfg.loss.pass_decay ** j)      # the metrics below stay unweighted
        metrics[f"loss_{j + 1}"] = float(pl.total.detach())
        metrics[f"reg_{j + 1}"] = float(pl.reg.detach())
        metrics[f"cls_{j + 1}"] = float(pl.cls.detach())
        metrics[f"topk_{j + 1}"] = float(pl.topk.detach())
        metrics[f"acc_{j + 1}"] = float(pl.acc)
        if j + 1 < cfg.loss.align_steps:
            levels.append(shift_level(pred, f_in))
    return metrics


def dataset_token_counts(ds, vocab_size: int) -> torch.Tensor:
    """How often each token is trained on (the loss tokens of a prepared folder)."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for i in range(len(ds)):
        item = ds[i]
        counts += torch.bincount(item["input_ids"].long()[item["loss_mask"].bool()], minlength=vocab_size)
    return counts


def dialogue_token_counts(target, source: str, batch: int = 512) -> torch.Tensor:
    """How often each token occurs in the assistant turns of the train split of `source`
    ('sharegpt' = the packaged ShareGPT file, or a ShareGPT JSON / JSONL of messages): a much
    larger sample than one stage's prepared folder, read in seconds (no target forward)."""
    from .data import load_dialogues, split
    dialogues, _ = split(load_dialogues(None if source == "sharegpt" else source))
    texts = [m["content"] for d in dialogues for m in d.messages if m["role"] == "assistant"]
    counts = torch.zeros(target.vocab_size, dtype=torch.long)
    for i in range(0, len(texts), batch):
        for ids in target.tokenizer(texts[i:i + batch], add_special_tokens=False)["input_ids"]:
            counts += torch.bincount(torch.tensor(ids, dtype=torch.long), minlength=target.vocab_size)
    log.info("token map: counted %d assistant tokens of %d dialogues of %s", int(counts.sum()), len(dialogues), source)
    return counts


def frequent_tokens(counts: torch.Tensor, n: int, always: set[int] = frozenset()) -> torch.Tensor:
    """The n most frequent tokens of `counts` (plus `always`, e.g. end-of-turn), sorted by id."""
    counts = counts.clone()
    for t in always:
        counts[t] = counts.max() + 1
    top = counts.topk(min(n, int((counts > 0).sum()))).indices
    return top.sort().values


class _Batches:
    """Shuffled batches of dialogue indices, resumable by (epoch, position)."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.bs, self.seed = n, batch_size, seed

    def epoch(self, e: int) -> list[list[int]]:
        order = list(range(self.n))
        random.Random(self.seed + e).shuffle(order)
        return [order[i:i + self.bs] for i in range(0, self.n, self.bs)]


def train(cfg: TrainConfig, on_metrics: Callable[[dict], None] | None = None,
          stop: threading.Event | None = None, device: str = "auto") -> Path:
    """Train a draft on a prepared feature folder; returns the output folder.

    Writes <out>/model.safetensors + config.json (the draft), train_state.pt (resume) and
    metrics.jsonl. `stop` ends the run early with a final checkpoint (used by the app).
    """
    from accelerate import Accelerator

    from .data import FeatureDataset, collate
    from .target import load_target

    cfg.validate()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    ds = FeatureDataset(cfg.data)
    if len(ds) == 0:
        raise ValueError(f"{cfg.data} holds no prepared dialogues")
    meta = ds.meta
    acc = Accelerator(cpu=(device == "cpu"), mixed_precision=mixed_precision(cfg.precision, device))
    torch.manual_seed(cfg.seed)
    target = load_target(meta.get("target_spec", "default"), device=str(acc.device))
    if target.hidden_size != meta.get("hidden_size", target.hidden_size):
        raise ValueError(f"{cfg.data} was prepared for hidden size {meta['hidden_size']}, "
                         f"the target has {target.hidden_size}")
    embed = target.embed_tokens
    state = None
    if cfg.resume and (out / STATE_FILE).is_file():
        draft = load_draft(out, target.config, acc.device, torch.float32)
        state = torch.load(out / STATE_FILE, map_location="cpu", weights_only=True)
        log.info("resuming %s from step %d", out, state["step"])
    else:
        token_map = None
        if cfg.draft_vocab:
            counts = dialogue_token_counts(target, cfg.vocab_data) if cfg.vocab_data else \
                dataset_token_counts(ds, target.vocab_size)
            token_map = frequent_tokens(counts, cfg.draft_vocab, target.eos_ids)
        if cfg.init:
            draft = load_draft(cfg.init, target.config, acc.device, torch.float32)
            if token_map is not None:           # continued with another vocabulary (same weights)
                draft.set_token_map(token_map)
        else:
            draft = new_draft(target.config, seed=cfg.seed, token_map=token_map, target=target.name).to(acc.device)
    # which model this draft serves, by what it is (hass.identity), so any copy of it finds the draft
    draft.config.hass.update(target=target.name, target_identity=target.identity, target_weights=target.weights)
    head = OutputHead(target.lm_head, draft.token_map)
    model = AlignedDraft(draft).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    if state is not None:
        opt.load_state_dict(state["optimizer"])
    model, opt = acc.prepare(model, opt)

    batches = _Batches(len(ds), cfg.batch_size, cfg.seed)
    steps_per_epoch = math.ceil(len(ds) / cfg.batch_size)
    total = max(1, int(steps_per_epoch * cfg.epochs))
    if cfg.max_steps:
        total = min(total, cfg.max_steps)
    warmup = max(1, int(total * cfg.warmup_frac))
    step = state["step"] if state else 0
    elapsed_before = state.get("elapsed_s", 0.0) if state else 0.0
    tokens_seen = state.get("tokens", 0) if state else 0
    gen = torch.Generator().manual_seed(cfg.seed + step)
    t_start = time.perf_counter()
    t_ckpt = t_start
    metrics_path = out / METRICS_FILE
    (out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2, default=str))
    pad_id = meta.get("pad_id", 0)

    def checkpoint() -> None:
        if acc.is_main_process:
            save_draft(acc.unwrap_model(model).draft, out)
            if cfg.snapshots:
                snap = save_draft(acc.unwrap_model(model).draft, out / "snapshots" / f"step-{step:06d}")
                (snap / "progress.json").write_text(json.dumps({
                    "step": step, "epoch": step / steps_per_epoch, "tokens": tokens_seen,
                    "elapsed_s": elapsed_before + time.perf_counter() - t_start}))
            _atomic_torch_save({"step": step, "optimizer": opt.state_dict(), "tokens": tokens_seen,
                                "elapsed_s": elapsed_before + time.perf_counter() - t_start}, out / STATE_FILE)

    stop = stop or threading.Event()
    restore = None
    if threading.current_thread() is threading.main_thread():
        # SIGTERM (kill, a job scheduler) stops cleanly with a checkpoint, as Ctrl-C does
        restore = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    log.info("training %s: %d dialogues, %d steps (%.2f epochs), n=%d K=%d w=%.2f, mixed precision %s", out,
             len(ds), total, cfg.epochs, cfg.loss.align_steps, cfg.loss.topk, cfg.loss.topk_weight,
             acc.mixed_precision)
    try:
        from tqdm.auto import tqdm
        bar = tqdm(total=total, initial=step, desc="train", unit="step", disable=not acc.is_main_process)
        while step < total:
            epoch, pos = divmod(step, steps_per_epoch)
            idx = batches.epoch(epoch)[pos]
            batch = {k: v.to(acc.device) for k, v in collate([ds[i] for i in idx], pad_id).items()
                     if isinstance(v, torch.Tensor)}
            lr = lr_at(step, total, warmup, cfg.lr)
            for g in opt.param_groups:
                g["lr"] = lr
            t0 = time.perf_counter()
            with acc.autocast():
                m = train_step(model, embed, head, batch, cfg, gen, acc.backward)
            if cfg.grad_clip_value:
                acc.clip_grad_value_(model.parameters(), cfg.grad_clip_value)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += m["tokens"]
            dt = time.perf_counter() - t0
            m.update(step=step, total_steps=total, epoch=step / steps_per_epoch, lr=lr,
                     tokens_per_s=m["tokens"] / dt if dt > 0 else 0.0, tokens_seen=tokens_seen,
                     elapsed_s=elapsed_before + time.perf_counter() - t_start)
            bar.update(1)
            bar.set_postfix(loss=f"{m['loss_1']:.3f}", acc=f"{m['acc_1']:.2f}", tok_s=f"{m['tokens_per_s']:.0f}")
            if acc.is_main_process and (step % cfg.log_every == 0 or step == total):
                with open(metrics_path, "a") as fh:
                    fh.write(json.dumps(m) + "\n")
            if on_metrics is not None:
                on_metrics(m)
            now = time.perf_counter()
            if now - t_ckpt > cfg.checkpoint_minutes * 60:
                checkpoint()
                t_ckpt = now
            if cfg.max_minutes and (now - t_start) > cfg.max_minutes * 60:
                log.info("time budget reached at step %d", step)
                break
            if stop.is_set():
                log.info("stopped at step %d", step)
                break
        bar.close()
    except KeyboardInterrupt:
        log.warning("interrupted: writing a checkpoint at step %d", step)
        checkpoint()
        raise
    finally:
        if restore is not None:
            signal.signal(signal.SIGTERM, restore)
    checkpoint()
    return out
