"""What visitors may change: everything locally, only their own session on a public Space.

The studio holds one model for every visitor. On a public Space (or when the operator says so
with `--public` / HASS_PUBLIC=1) a visitor must not swap that model, read drafts or data
from arbitrary server paths, or start training runs the Space's 2 vCPUs cannot afford; the
operator chooses the model and drafts with `--model` / `--draft` when the app starts.
Locally (the default) nothing is restricted.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import NotAllowed


def public_from_env(flag: bool | None = None) -> bool:
    """--public wins; else HASS_PUBLIC=1/0; else public exactly when running on a Space."""
    if flag is not None:
        return flag
    env = os.environ.get("HASS_PUBLIC", "").strip().lower()
    if env in ("1", "true", "yes", "on"):
        return True
    if env in ("0", "false", "no", "off"):
        return False
    return bool(os.environ.get("SPACE_ID"))


@dataclass(frozen=True)
class Policy:
    """Limits of a public studio (all off locally)."""

    public: bool = False
    max_train_steps: int = 200          # ~2-4 minutes of a 2-vCPU Space per run
    max_train_minutes: float = 5.0
    max_prepare_dialogues: int = 32
    max_new_tokens: int = 1024

    @classmethod
    def from_env(cls, flag: bool | None = None) -> "Policy":
        return cls(public=public_from_env(flag))

    def check_model_load(self) -> None:
        if self.public:
            raise NotAllowed("this is a public studio: the model is shared by every visitor, so it is chosen by the "
                             "operator (app.py --model) and cannot be changed here")

    def check_draft_path(self) -> None:
        if self.public:
            raise NotAllowed("this is a public studio: drafts cannot be loaded from server paths here; pick a "
                             "shipped draft or one trained in this app")

    def check_data_path(self, data: str, allowed_root) -> None:
        """On a public studio training reads only data prepared by the app itself."""
        if not self.public:
            return
        try:
            Path(data).expanduser().resolve().relative_to(Path(allowed_root).resolve())
        except ValueError:
            raise NotAllowed("this is a public studio: training reads only data prepared here (the Prepare "
                             f"button), not {data!r}") from None

    def train_budget(self, budget: str, steps, minutes) -> None:
        if not self.public:
            return
        if budget == "steps" and steps is not None and float(steps) > self.max_train_steps:
            raise NotAllowed(f"this is a public studio: at most {self.max_train_steps} training steps per run")
        if budget == "minutes" and minutes is not None and float(minutes) > self.max_train_minutes:
            raise NotAllowed(f"this is a public studio: at most {self.max_train_minutes:g} minutes per training run")

    def check_prepare(self, n) -> None:
        if self.public and n is not None and float(n) > self.max_prepare_dialogues:
            raise NotAllowed(f"this is a public studio: prepare at most {self.max_prepare_dialogues} dialogues")

    def check_new_tokens(self, n) -> None:
        if self.public and n is not None and float(n) > self.max_new_tokens:
            raise NotAllowed(f"this is a public studio: at most {self.max_new_tokens} new tokens per answer")

    def describe(self) -> str:
        if not self.public:
            return ""
        return (f"Public studio: the model is fixed by the operator; drafts from server paths are off; training runs "
                f"are limited to {self.max_train_steps} steps or {self.max_train_minutes:g} minutes on data "
                f"prepared here (at most {self.max_prepare_dialogues} dialogues); answers to "
                f"{self.max_new_tokens} new tokens.")
