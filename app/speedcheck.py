"""Is the studio as fast as the command line? Measures tokens/s of the app's own chat handler
against `python -m hass generate` for the same prompt and settings.

    python -m app.speedcheck --prompt "Explain in three sentences why the sky is blue." --max-new-tokens 128

The app side runs `app.chat.send`, the generator the Chat tab's Send button streams, headless:
its decoding thread, token texts, highlighting and throttled figures, and every update goes
through what the Gradio server does with it (the Send event's `postprocess_data`, the stream
diff and its JSON), with torch threads set as `python app.py` sets them. Not measured: the
websocket / SSE transport and the browser, which may sit on another machine. Its tokens/s is
new tokens over the wall time from the call to the last update. The CLI side runs
`python -m hass generate ... --json` with the same prompt, model, draft, mode, tree and token
budget (in this process by default, so both share threads and warm caches; `--subprocess`
starts the real command with the same thread count) and reads its `tokens_per_s`. The two
alternate for `--rounds` rounds after one warm-up each; the medians and their ratio are
printed, with the machine's load, since a busy machine moves both numbers. Exit status 1
when the app is more than `--tolerance` slower.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _entry():
    """app.py (the package `app/` shadows it as a module name)."""
    spec = importlib.util.spec_from_file_location("hass_studio_entry", ROOT / "app.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class GradioSink:
    """What the Gradio server does with each update of the Send event before it goes out:
    `Blocks.postprocess_data` (component postprocessing, `gr.skip()` handling, figure JSON),
    the diff against the previous update of the stream and the JSON encoding of that diff.
    Runs in the caller's thread, as the server's event loop shares the process (and the GIL)
    with the decoding thread."""

    def __init__(self, studio):
        import asyncio

        from gradio.state_holder import SessionState

        from app.ui import build

        self.demo = build(studio)
        self.fn = next(f for f in self.demo.fns.values() if f.api_name == "send")
        self.state = SessionState(self.demo)
        self.loop = asyncio.new_event_loop()
        self.prev: list | None = None

    def push(self, out) -> int:
        import orjson
        from gradio.utils import diff

        data = self.loop.run_until_complete(self.demo.postprocess_data(self.fn, list(out), self.state))
        if self.prev is None:
            msg = data
        else:
            msg = [diff(a, b) for a, b in zip(self.prev, data)]
        self.prev = data
        return len(orjson.dumps(msg, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_PASSTHROUGH_DATETIME,
                                default=str))

    def reset(self) -> None:
        self.prev = None


def app_run(studio, sink: GradioSink, prompt: str, mode: str, settings: dict, draft_spec: str) -> dict:
    from app import chat
    from app.studio import Session
    from hass.events import summarize

    session = Session(draft_spec=draft_spec)
    sink.reset()
    updates = 0
    sent = 0
    t0 = time.perf_counter()
    for out in chat.send(studio, session, prompt, mode, 0, 1, settings["max_new_tokens"], settings["total_tokens"],
                         settings["depth"], settings["top_k"], True):
        sent += sink.push(out)
        updates += 1
    wall = time.perf_counter() - t0
    turn = session.turns[-1] if session.turns else None
    if turn is None or not turn.ids:
        raise SystemExit(f"the app produced no answer: {out[3]}")
    s = summarize(turn.steps)
    return {"tokens": len(turn.ids), "wall_s": wall, "tokens_per_s": len(turn.ids) / wall, "ids": turn.ids,
            "decoder_tokens_per_s": s.tokens_per_s, "updates": updates, "sent_chars": sent, "tau": s.tau}


def cli_args(args, settings: dict) -> list[str]:
    return ["generate", "--prompt", args.prompt, "--model", args.model, "--draft", args.draft,
            "--mode", "plain" if args.mode == "plain" else "hass", "--max-new-tokens", str(settings["max_new_tokens"]),
            "--total-tokens", str(settings["total_tokens"]), "--depth", str(settings["depth"]),
            "--top-k", str(settings["top_k"]), "--temperature", "0", "--json"]


def cli_run(args, settings: dict, threads: int) -> dict:
    argv = cli_args(args, settings)
    if args.subprocess:
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        proc = subprocess.run([sys.executable, "-m", "hass", *argv], cwd=ROOT, env=env, capture_output=True,
                              text=True, check=False)
        if proc.returncode:
            raise SystemExit(f"python -m hass generate failed:\n{proc.stderr[-2000:]}")
        text = proc.stdout
    else:
        from hass.__main__ import main as hass_main
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            code = hass_main(argv)
        if code:
            raise SystemExit(f"python -m hass generate failed with status {code}")
        text = buf.getvalue()
    out = json.loads(text.strip().splitlines()[-1])
    return {"tokens": out["new_tokens"], "wall_s": out["wall_s"], "tokens_per_s": out["tokens_per_s"],
            "ids": out["token_ids"], "tau": out["tau"]}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m app.speedcheck", description=__doc__.split("\n\n")[0])
    p.add_argument("--prompt", default="Explain in three sentences why the sky is blue.")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--model", default="default")
    p.add_argument("--draft", default="default", help="'default', 'hass', 'eagle2', 'random' or a folder")
    p.add_argument("--mode", choices=("HASS", "plain"), default="HASS")
    p.add_argument("--total-tokens", type=int, default=None, help="tree size (default: the app's default)")
    p.add_argument("--depth", type=int, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--rounds", type=int, default=3, help="measured runs of each side, alternating")
    p.add_argument("--threads", type=int, default=0, help="torch threads as in `python app.py --threads`")
    p.add_argument("--subprocess", action="store_true", help="run the CLI as a real subprocess")
    p.add_argument("--tolerance", type=float, default=0.10, help="allowed shortfall of the app (0.10 = 10%%)")
    p.add_argument("--json", action="store_true", help="print one JSON object at the end")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import logging
    logging.basicConfig(level=logging.WARNING)
    threads = _entry().set_threads(args.threads)
    from app.studio import Studio
    from hass.device import usable_cpus

    studio = Studio.load(args.model, args.draft)
    t = studio.tree_defaults
    settings = {"max_new_tokens": args.max_new_tokens, "total_tokens": args.total_tokens or t.total_tokens,
                "depth": args.depth or t.depth, "top_k": args.top_k or t.top_k}
    load = os.getloadavg()
    print(f"model {studio.target.name} · draft {studio.draft_for(args.draft)[1]} · mode {args.mode} · tree "
          f"{settings['total_tokens']}/{settings['depth']}/{settings['top_k']} · {settings['max_new_tokens']} new "
          f"tokens · torch threads {threads} of {usable_cpus()} usable cores · load average {load[0]:.2f} "
          f"{load[1]:.2f} {load[2]:.2f} · CLI {'subprocess' if args.subprocess else 'in process'}", flush=True)
    warm = dict(settings, max_new_tokens=min(16, settings["max_new_tokens"]))
    sink = GradioSink(studio)
    app_run(studio, sink, args.prompt, args.mode, warm, args.draft)
    cli_run(args, warm, threads)
    rows: list[tuple[str, dict]] = []
    for r in range(args.rounds):
        for side in (("app", "cli") if r % 2 == 0 else ("cli", "app")):
            res = app_run(studio, sink, args.prompt, args.mode, settings, args.draft) if side == "app" \
                else cli_run(args, settings, threads)
            rows.append((side, res))
            extra = (f" · decoder-only {res['decoder_tokens_per_s']:.1f} tok/s · {res['updates']} UI updates"
                     if side == "app" else "")
            print(f"round {r + 1} {side:>3}: {res['tokens']} tokens in {res['wall_s']:.2f} s = "
                  f"{res['tokens_per_s']:.1f} tok/s · τ {res['tau']:.2f}{extra}", flush=True)
    app_tps = statistics.median(x["tokens_per_s"] for s, x in rows if s == "app")
    cli_tps = statistics.median(x["tokens_per_s"] for s, x in rows if s == "cli")
    same = all(x["ids"] == rows[0][1]["ids"] for _, x in rows)
    ratio = app_tps / cli_tps if cli_tps > 0 else 0.0
    ok = ratio >= 1 - args.tolerance
    load_end = os.getloadavg()
    print(f"\napp {app_tps:.1f} tok/s · CLI {cli_tps:.1f} tok/s (medians of {args.rounds}) · app / CLI = "
          f"{ratio:.3f} · {'within' if ok else 'NOT within'} {args.tolerance:.0%} · same token ids: "
          f"{'yes' if same else 'NO'} · load average now {load_end[0]:.2f}")
    if args.json:
        print(json.dumps({"app_tokens_per_s": app_tps, "cli_tokens_per_s": cli_tps, "ratio": ratio, "ok": ok,
                          "same_ids": same, "threads": threads, "load_before": load, "load_after": load_end,
                          "settings": settings, "runs": [{"side": s, **{k: v for k, v in x.items() if k != "ids"}}
                                                        for s, x in rows]}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
