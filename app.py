"""HASS Studio entry point (locally and on Hugging Face Spaces).

    python app.py [--host 127.0.0.1] [--port 7860] [--share] [--model SPEC] [--draft DIR]

starts the Gradio studio; `--cli` starts the terminal chat instead (tokens coloured by
draft depth, stats after every answer; without a terminal on stdin it answers one example).
On Spaces the app binds 0.0.0.0 (the Space's proxy needs it) and `--model` may be a hub id.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time

EXAMPLE = "Explain in three sentences why the sky is blue."


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="HASS Studio")
    p.add_argument("--host", default=None, help="address to bind (default 127.0.0.1: local only; 0.0.0.0 on Spaces)")
    p.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    p.add_argument("--share", action="store_true", help="ask Gradio for a public link")
    p.add_argument("--model", default=os.environ.get("HASS_MODEL", "default"),
                   help="'default', a model folder, a .gguf file or a hub id")
    p.add_argument("--draft", default=os.environ.get("HASS_DRAFT", "default"),
                   help="draft folder, 'hass', 'eagle2', 'random' or 'default'")
    p.add_argument("--max-new-tokens", type=int, default=256, help="(--cli) tokens per answer")
    p.add_argument("--cli", action="store_true", help="the terminal chat instead of the web studio")
    p.add_argument("--public", action=argparse.BooleanOptionalAction, default=None,
                   help="lock what visitors may change (the model, server paths, training size); default: on "
                        "exactly when running on a Hugging Face Space (SPACE_ID), or HASS_PUBLIC=1/0")
    p.add_argument("--threads", type=int, default=int(os.environ.get("HASS_THREADS", 0)),
                   help="torch CPU threads (0 = all cores but one, so the web server keeps a core)")
    return p.parse_args(argv)


def chat(args: argparse.Namespace) -> None:
    """The terminal chat."""
    from hass.assets import resolve_draft
    from hass.decode import GenerationConfig, speculative_generate
    from hass.events import summarize
    from hass.stream import TextStream
    from hass.target import load_target

    target = load_target(args.model)
    draft, label = resolve_draft(args.draft, target)
    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens)
    interactive = sys.stdin.isatty()
    color = sys.stdout.isatty()
    print(f"HASS Studio: {target.source}, draft: {label}. "
          + ("Type a message (empty line or Ctrl-D to quit, /clear to reset)." if interactive else ""))
    history: list[dict] = []
    while True:
        if interactive:
            try:
                text = input("\nyou> ").strip()
            except EOFError:
                break
            if not text:
                break
            if text == "/clear":
                history.clear()
                continue
        else:
            text = EXAMPLE
            print(f"\nyou> {text}")
        messages = history + [{"role": "user", "content": text}]
        try:
            ids = target.render(messages)
            stream = TextStream(target)
            steps, t0 = [], time.perf_counter()
            print("assistant> ", end="", flush=True)
            for step in speculative_generate(target, draft, ids, cfg):
                steps.append(step)
                print(stream.push(step, color=color), end="", flush=True)
            print(stream.flush())
        except ValueError as exc:           # e.g. the conversation outgrew the context
            print(f"\n[error] {exc}")
            continue
        except KeyboardInterrupt:
            print("\n[stopped]")
            continue
        wall = time.perf_counter() - t0
        s = summarize(steps)
        answer = target.decode([t for st in steps for t in st.new_tokens])
        history = messages + [{"role": "assistant", "content": answer}]
        print(f"[{s.new_tokens} tokens, {s.new_tokens / max(wall, 1e-9):.1f} tok/s, {s.target_forwards} target "
              f"forwards, tau {s.tau:.2f}, stop: {s.stop_reason}]")
        if not interactive:
            break


def build_app(model: str = "default", draft: str = "default", public: bool | None = None):
    """(demo, css) with the model loaded once; shared by every session."""
    from app.policy import Policy
    from app.studio import Studio
    from app.training import TrainingManager
    from app.ui import build, css

    policy = Policy.from_env(public)
    studio = Studio.load(model, draft, training=TrainingManager(policy=policy), policy=policy)
    demo = build(studio)
    demo.queue(default_concurrency_limit=1, max_size=64)
    return demo, css()


def set_threads(n: int = 0) -> int:
    """Decoding is CPU-bound and the web server needs a core too: by default torch gets
    every core but one (on a 2-core machine two torch threads next to the server make each
    forward several times slower). The cores counted are the ones the container's CPU quota
    allows (a Space has 2 vCPUs on a large host)."""
    from hass.device import fit_threads

    return fit_threads(n, spare=1)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    if args.cli:
        chat(args)
        return
    on_spaces = bool(os.environ.get("SPACE_ID"))
    host = args.host or os.environ.get("GRADIO_SERVER_NAME") or ("0.0.0.0" if on_spaces else "127.0.0.1")
    threads = set_threads(args.threads)
    logging.getLogger("hass-studio").info("serving on %s:%d (%s), %d torch threads", host, args.port,
                                          "a Space: SPACE_ID is set" if on_spaces else "local", threads)
    demo, style = build_app(args.model, args.draft, args.public)
    demo.launch(server_name=host, server_port=args.port, share=args.share, css=style, show_error=True)


if __name__ == "__main__":
    main()
