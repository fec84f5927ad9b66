"""Per-device tree profiles: the tree shape `tune` measured to be fastest here.

A profile is keyed by device kind, thread count, matmul kernels, target and draft, so a
laptop, a CPU server and a GPU each keep their own (and a tree tuned for one kernel choice
is not used with another: verify costs differ). Explicit settings always win over a profile.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import re
from pathlib import Path

import torch

from .device import usable_cpus
from .target import cache_root
from .tree import TreeConfig

log = logging.getLogger(__name__)

PAPER_TREE = TreeConfig(60, 6, 10)
# with no tree settings the size is fitted per step (hass.fit): draft growth up to 6 depths of
# 8 children (it stops earlier when another depth would not pay), at most 64 nodes verified
FITTED_TREE = TreeConfig(64, 6, 8)


def device_key(device: torch.device, kernels: str = "stock") -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{platform.machine()}-{usable_cpus()}cpu-{torch.get_num_threads()}threads"
    if kernels != "stock":
        name += f"-{kernels}"
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{device.type}-{name}")


def profile_path(device: torch.device, target_name: str, draft_label: str, kernels: str = "stock") -> Path:
    key = f"{device_key(device, kernels)}__{target_name}__{Path(draft_label).name}"
    return cache_root() / "profiles" / f"{key}.json"


def save_profile(path: Path, tree: TreeConfig, details: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"total_tokens": tree.total_tokens, "depth": tree.depth, "top_k": tree.top_k,
                               **details}, indent=2))
    os.replace(tmp, path)
    return path


def load_profile(path: Path) -> TreeConfig | None:
    if not path.is_file():
        return None
    try:
        d = json.loads(path.read_text())
        return TreeConfig(int(d["total_tokens"]), int(d["depth"]), int(d["top_k"])).validate()
    except (ValueError, KeyError, json.JSONDecodeError) as exc:
        log.warning("ignoring unreadable tree profile %s: %s", path, exc)
        return None


def nearest_profile(path: Path) -> Path | None:
    """`path` if it exists, else the profile of the same CPU, kernels, target and draft tuned
    with the nearest other thread count (the app keeps a core for its server, so it often
    runs with fewer threads than `tune` did; the best tree shape barely moves with that)."""
    if path.is_file():
        return path
    m = re.match(r"^(cpu-.+-\d+cpu-)(\d+)threads(.*)$", path.stem)
    if not m:
        return None
    want = int(m.group(2))
    found = []
    for other in path.parent.glob(f"{m.group(1)}*threads{m.group(3)}.json"):
        o = re.match(rf"^{re.escape(m.group(1))}(\d+)threads{re.escape(m.group(3))}$", other.stem)
        if o:
            found.append((abs(int(o.group(1)) - want), int(o.group(1)), other))
    return min(found)[2] if found else None


def resolve_rule(total_tokens: int | None, depth: int | None, top_k: int | None, device: torch.device,
                 target_name: str, draft_label: str, kernels: str = "stock") -> tuple[TreeConfig, bool, str]:
    """(tree, fitted, where it came from): no tree setting at all -> the tree `tune` measured
    on this device when there is one, else the size fitted per step for this machine (growth
    `FITTED_TREE`); any setting -> a fixed tree (`resolve_tree`)."""
    if total_tokens is None and depth is None and top_k is None:
        found = nearest_profile(profile_path(device, target_name, draft_label, kernels))
        if found is None or load_profile(found) is None:
            return FITTED_TREE, True, "fitted per step"
    tree, source = resolve_tree(total_tokens, depth, top_k, device, target_name, draft_label, kernels)
    return tree, False, source


def resolve_tree(total_tokens: int | None, depth: int | None, top_k: int | None, device: torch.device,
                 target_name: str, draft_label: str, kernels: str = "stock") -> tuple[TreeConfig, str]:
    """Explicit values win; missing ones come from this device's profile (or the one tuned
    with the nearest thread count), else the paper's 60/6/10."""
    path = profile_path(device, target_name, draft_label, kernels)
    found = nearest_profile(path)
    prof = load_profile(found) if found else None
    base, source = (prof, "device profile") if prof else (PAPER_TREE, "paper default")
    if prof and found != path:
        source = f"device profile tuned with other threads: {found.name}"
    tree = TreeConfig(total_tokens if total_tokens is not None else base.total_tokens,
                      depth if depth is not None else base.depth,
                      top_k if top_k is not None else base.top_k)
    if None not in (total_tokens, depth, top_k):
        source = "explicit"
    return tree.validate(), source
