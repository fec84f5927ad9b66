"""Where shipped drafts live, and how a `--draft` value becomes a loaded draft head."""
from __future__ import annotations

import json
import logging
from functools import lru_cache
from pathlib import Path

import torch

from .device import resolve_draft_dtype
from .draft import DraftHead, load_draft, new_draft
from .target import DEFAULT_NAME, Target

log = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parent.parent / "assets"
DRAFTS = ASSETS / "drafts"
SHIPPED = {DEFAULT_NAME: {"hass": "smollm2-135m-hass", "eagle2": "smollm2-135m-eagle2"}}


@lru_cache(maxsize=8)
def _shipped_targets(drafts: Path = DRAFTS) -> dict[str, str]:
    """identity digest -> target name, from the shipped drafts' config.json (`hass` section)."""
    out: dict[str, str] = {}
    for cfg in sorted(drafts.glob("*/config.json")):
        try:
            extra = json.loads(cfg.read_text()).get("hass", {}) or {}
        except (OSError, json.JSONDecodeError):
            continue
        if extra.get("target_identity") and extra.get("target"):
            out[str(extra["target_identity"])] = str(extra["target"])
    return out


def known_name(identity: str) -> str | None:
    """The name the shipped drafts use for the model with this identity (`hass.identity`), so
    SmolLM2-135M-Instruct loaded from a folder or the hub id finds the drafts the GGUF one does."""
    return _shipped_targets().get(identity)


def shipped_draft(target: Target, kind: str = "hass") -> Path | None:
    """The folder of a shipped draft for this target, if one exists."""
    name = SHIPPED.get(target.name, {}).get(kind)
    if name and (DRAFTS / name / "model.safetensors").is_file():
        return DRAFTS / name
    return None


def resolve_draft(spec: str | None, target: Target, seed: int = 0,
                  dtype: str | torch.dtype = "auto") -> tuple[DraftHead, str]:
    """'default' -> the shipped HASS draft (else a random one, with a warning);
    'hass'/'eagle2' -> that shipped draft; 'none'/'random' -> random; else a folder.

    Returns the draft (on the target's device; dtype 'auto' = bf16 on CPUs with native bf16,
    else the target's, see `resolve_draft_dtype`) and a label saying what it is.
    """
    spec = (spec or "default").strip()
    dt = resolve_draft_dtype(dtype, target.device, target.dtype)
    if spec in ("default", "hass", "eagle2"):
        folder = shipped_draft(target, "hass" if spec == "default" else spec)
        if folder is None:
            if spec != "default":
                raise FileNotFoundError(f"no shipped {spec} draft for {target.name} (looked in {DRAFTS})")
            log.warning("no trained draft ships for %s yet: using a random draft "
                        "(output is still exact, but few tokens are accepted)", target.name)
            return new_draft(target.config, seed=seed).to(target.device, dt).eval(), "random"
        return load_draft(folder, target.config, target.device, dt), folder.name
    if spec in ("none", "random"):
        log.warning("using a random draft: output is exact, but few draft tokens will be accepted")
        return new_draft(target.config, seed=seed).to(target.device, dt).eval(), "random"
    return load_draft(spec, target.config, target.device, dt), Path(spec).expanduser().resolve().name  # a short name, never a path
