"""`make race-check`: the studio's race of plain decoding against HASS, as a new user meets it.

1. app.py starts with an empty HASS_CACHE (so the model is converted, and the verify cost
   curve measured, on first use) and the shipped drafts, on 127.0.0.1.
2. Debian's Chromium (driven by Playwright, never a downloaded browser) opens the Race tab,
   enters the prompt and clicks "Race plain vs HASS", `--runs` times one after the other.
3. Each race's verdict is read from the page when it ends (the studio's own words: "HASS
   (…): 1.31× faster than plain · plain 4.1 s vs HASS 3.1 s for the same 55 new tokens"),
   printed, and written with the machine's load average to `--out` (JSON).
`--temperature T` sets the studio's temperature first (at T > 0 both sides sample with one
seed, and coupled sampling makes them write the same tokens: the verdict says whether the
token ids were identical). `--threads N` starts the app with N torch threads instead of its
default (every usable core but one). Exit status 0 when every race ended with a verdict,
whatever it says.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from hass.device import cpu_description  # noqa: E402  (the repo's own package, beside this tool)
CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]
VERDICT = r"faster than plain|the speed of plain|as fast as plain|no result|failed|stopped"
# the studio's ratio words (visual.charts.speed_words): the number is the speedup in every form
RATIO = r"([\d.]+)× faster than plain|([\d.]+)× the speed of plain|as fast as plain \(([\d.]+)×\)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(cache: Path, port: int, log: Path, startup_s: float = 600, threads: int = 0) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("HASS_PUBLIC", "HASS_MODEL", "HASS_DRAFT", "SPACE_ID")}
    env.update(HASS_CACHE=str(cache), GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1")
    flags = ["--threads", str(threads)] if threads > 0 else []
    proc = subprocess.Popen([sys.executable, "app.py", "--port", str(port), *flags], cwd=ROOT, env=env,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < startup_s:
        if proc.poll() is not None:
            raise SystemExit(f"app.py exited with status {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            time.sleep(2)
    proc.kill()
    raise SystemExit(f"app.py did not listen on port {port} within {startup_s:.0f} s")


def race(page, prompt: str, timeout_s: float) -> str:
    """One race through the page; the status line once it holds a verdict."""
    status = page.locator("#hs-race-status")
    page.locator("#hs-race-prompt textarea").fill(prompt)
    before = status.inner_text() if status.count() else ""
    page.locator("#hs-race").click()
    t0, started = time.perf_counter(), False
    while time.perf_counter() - t0 < timeout_s:
        text = status.inner_text() if status.count() else ""
        started = started or not re.search(VERDICT, text)      # the previous race's verdict is gone
        if started and re.search(VERDICT, text) and text != before:
            return " ".join(text.split())
        page.wait_for_timeout(250)
    raise SystemExit(f"no verdict within {timeout_s:.0f} s (last status: {text!r})")


def set_temperature(page, value: float) -> None:
    """The chat tab's temperature (the race takes the chat's sampling settings)."""
    page.locator("#hs-settings").get_by_text("Settings").first.click()
    box = page.locator("#hs-temperature input[type=number]")
    box.fill(f"{value:g}")
    box.press("Tab")
    page.locator("#hs-settings").get_by_text("Settings").first.click()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompt", default="Explain in three sentences why the sky is blue.")
    p.add_argument("--runs", type=int, default=3, help="races one after the other (the first on the fresh cache)")
    p.add_argument("--out", type=Path, default=Path("runs/race-check.json"))
    p.add_argument("--timeout", type=float, default=300, help="seconds a race may take")
    p.add_argument("--temperature", type=float, default=0.0, help="the studio's temperature setting for the races "
                   "(above 0 both sides sample with one seed: coupled sampling makes them write the same tokens)")
    p.add_argument("--threads", type=int, default=0, help="torch threads of the app (`app.py --threads`; "
                   "0 = the app's default: every usable core but one, left to the web server)")
    args = p.parse_args(argv)
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory(prefix="race-check-") as tmp:
        work = Path(tmp)
        port = free_port()
        load_before = os.getloadavg()
        proc = start_app(work / "cache", port, work / "app.log", threads=args.threads)
        verdicts = []
        try:
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
                page = browser.new_page()
                page.set_default_timeout(120_000)
                page.goto(f"http://127.0.0.1:{port}")
                page.wait_for_selector("#hs-msg textarea")
                if args.temperature:
                    set_temperature(page, args.temperature)
                page.get_by_role("tab", name="Race / A-B").click()
                page.wait_for_selector("#hs-race-prompt textarea")
                for i in range(args.runs):
                    verdicts.append(race(page, args.prompt, args.timeout))
                    print(f"[race-check] race {i + 1}: {verdicts[-1]}", flush=True)
                browser.close()
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    ratios = [float(next(g for g in m.groups() if g)) for v in verdicts if (m := re.search(RATIO, v))]
    report = {"prompt": args.prompt, "temperature": args.temperature, "verdicts": verdicts, "speedups": ratios,
              "cpu": cpu_description(), "app_threads": args.threads or "the app's default",
              "load_average_before": load_before, "load_average_after": os.getloadavg()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, ensure_ascii=False))
    print(f"[race-check] speedups {', '.join(f'{r:.2f}x' for r in ratios)}; written to {args.out}")
    return 0 if len(ratios) == args.runs else 1


if __name__ == "__main__":
    sys.exit(main())
