"""What one target forward costs on this device: load time, plain steps, tree verification.

These are the numbers that decide how big a draft tree pays off (a verify forward over N
tree tokens must cost less than the tokens it is expected to accept).
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time

import torch

from .device import cpu_description
from .target import LAST, load_target
from .tree import ancestor_mask, verify_mask


def median_time(fn, repeats: int, device: torch.device) -> float:
    """Median wall seconds of fn() over `repeats` runs (waiting for the device)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_costs(spec: str, device: str, dtype: str, sizes: list[int], prefix: int, repeats: int,
                  kernels: str = "auto") -> dict:
    """Load times (cold = dequantise into an empty cache, for GGUF specs), plain tokens/s and
    the median time of one verify forward over N tree tokens after `prefix` cached tokens."""
    if prefix < 1 or repeats < 1 or not sizes or min(sizes) < 1:
        raise ValueError("prefix, repeats and every size must be >= 1")
    report: dict = {"model": spec}
    if spec == "default" or spec.endswith(".gguf"):
        old = os.environ.get("HASS_CACHE")
        with tempfile.TemporaryDirectory() as tmp:
            os.environ["HASS_CACHE"] = tmp
            try:
                report["load_cold_s"] = load_target(spec, device, dtype, kernels=kernels).load_seconds
            finally:
                if old is None:
                    os.environ.pop("HASS_CACHE", None)
                else:
                    os.environ["HASS_CACHE"] = old
    t0 = time.perf_counter()
    target = load_target(spec, device, dtype, kernels=kernels)
    report["load_cached_s"] = time.perf_counter() - t0
    dev = target.device
    report["device"], report["dtype"] = str(dev), str(target.dtype).removeprefix("torch.")
    report["kernels"] = target.kernels
    report["threads"] = torch.get_num_threads()
    if dev.type == "cpu":
        report["cpu"] = cpu_description()
    g = torch.Generator().manual_seed(0)
    if prefix + max(sizes) + 1 >= target.max_length:
        raise ValueError(f"prefix + tree size must stay below the context ({target.max_length})")
    ids = torch.randint(0, target.vocab_size, (1, prefix), generator=g).to(dev)
    cache = target.new_cache()
    target.forward(ids, cache, logits_rows=LAST)

    def plain_step():
        target.forward(ids[:, :1], cache, position_ids=torch.tensor([[prefix]], device=dev))
        cache.crop(-1)

    for _ in range(3):
        plain_step()
    plain = median_time(plain_step, repeats, dev)
    report["plain_step_s"] = plain
    report["plain_tokens_per_s"] = 1.0 / plain
    report["verify"] = [{"tokens": n, "seconds": t, "relative_to_plain_step": t / plain}
                        for n, t in verify_costs(target, prefix, sizes, repeats).items()]
    return report


@torch.inference_mode()
def verify_costs(target, prefix: int, sizes: list[int], repeats: int = 5) -> dict[int, float]:
    """Median seconds of one verify forward over N tree tokens after `prefix` cached tokens
    (a bushy tree like EAGLE-2 makes: node i hangs under node (i-1)//3). The sizes take turns
    (round r times every size once), so a change of the machine's load mid-measurement
    touches every size alike instead of bending the curve at the sizes it happened to hit."""
    dev = target.device
    ids = torch.randint(0, target.vocab_size, (1, prefix + max(sizes)), generator=torch.Generator().manual_seed(0))
    ids = ids.to(dev)
    cache = target.new_cache()
    target.forward(ids[:, :prefix], cache, logits_rows=LAST)
    runs = {}
    for n in sizes:
        parents = torch.tensor([-1] + [(i - 1) // 3 for i in range(1, n)], device=dev)
        anc = ancestor_mask(parents)
        mask = verify_mask(anc, prefix, target.dtype)
        pos = (prefix + anc.sum(-1) - 1)[None]

        def run(n=n, pos=pos, mask=mask):
            target.forward(ids[:, prefix:prefix + n], cache, position_ids=pos, attention_mask=mask)
            cache.crop(-n)
        run()                                     # warm-up
        runs[n] = run
    times: dict[int, list[float]] = {n: [] for n in sizes}
    for _ in range(repeats):
        for n in sizes:
            times[n].append(median_time(runs[n], 1, dev))
    return {n: statistics.median(t) for n, t in times.items()}


def format_costs(r: dict) -> str:
    lines = [f"model {r['model']} on {r['device']} ({r['dtype']}, {r.get('kernels', 'stock')} kernels)"]
    if "cpu" in r:
        lines.append(f"cpu: {r['cpu']}, {r.get('threads', '?')} torch threads")
    if "load_cold_s" in r:
        lines.append(f"load: cold {r['load_cold_s']:.1f}s (dequantise + cache), cached {r['load_cached_s']:.1f}s")
    else:
        lines.append(f"load: {r['load_cached_s']:.1f}s")
    lines.append(f"plain step: {r['plain_step_s'] * 1e3:.1f} ms = {r['plain_tokens_per_s']:.1f} tokens/s")
    lines.append("verify forward over N tree tokens:")
    for v in r["verify"]:
        lines.append(f"  N={v['tokens']:>4}: {v['seconds'] * 1e3:7.1f} ms = {v['relative_to_plain_step']:.2f}x a plain step")
    return "\n".join(lines)
