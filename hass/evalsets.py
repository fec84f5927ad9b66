"""The evaluation prompt sets (MT-bench, HumanEval, GSM8K; 80 questions each, `turns`)."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

SETS = ("mt_bench", "humaneval", "gsm8k")
_REPO = Path(__file__).resolve().parent.parent


def eval_dir() -> Path:
    """$HASS_EVAL_DIR, else ../shared/data/eval beside the checkout, else the copy in assets/eval."""
    env = os.environ.get("HASS_EVAL_DIR")
    if env:
        return Path(env)
    shared = _REPO.parent / "shared" / "data" / "eval"
    return shared if shared.is_dir() else _REPO / "assets" / "eval"


@dataclass(frozen=True)
class Question:
    set: str
    id: str
    turns: list[str]


def load_set(name_or_path: str, limit: int | None = None) -> list[Question]:
    """A named set or any JSONL file whose lines carry `turns` (a list of user messages)."""
    path = Path(name_or_path)
    if not path.suffix:
        path = eval_dir() / f"{name_or_path}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"evaluation set not found: {path}")
    out = []
    for i, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{i + 1}: not JSON ({exc})") from exc
        turns = rec.get("turns")
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
            raise ValueError(f"{path}:{i + 1}: needs a non-empty list of strings under 'turns'")
        out.append(Question(path.stem, str(rec.get("question_id", i)), turns))
        if limit is not None and len(out) >= limit:
            break
    return out
