"""HASS Studio entry point (locally and on Spaces).

Until the Gradio studio lands this starts a terminal chat: tokens stream as they are
verified, accepted draft tokens are coloured by depth, and every answer ends with its
speculative-decoding stats. Without a terminal on stdin it answers one example prompt.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time

from hass.assets import resolve_draft
from hass.decode import GenerationConfig, speculative_generate
from hass.events import summarize
from hass.stream import TextStream
from hass.target import load_target

EXAMPLE = "Explain in three sentences why the sky is blue."


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="HASS Studio demo")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (the web studio; default: local only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", action="store_true", help="ask Gradio for a public link (web studio)")
    p.add_argument("--model", default="default", help="'default', a model folder, a .gguf file or a hub id")
    p.add_argument("--draft", default="default", help="draft folder, 'hass', 'eagle2' or 'none'")
    p.add_argument("--max-new-tokens", type=int, default=256)
    return p.parse_args(argv)


def chat(args: argparse.Namespace) -> None:
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


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    chat(parse_args(argv))


if __name__ == "__main__":
    main()
