"""Incremental detokenisation of step events, for terminals and other text streams.

Text is decoded from the token ids seen so far and only the new suffix is emitted, so
multi-byte characters split across tokens come out whole.
"""
from __future__ import annotations

from .events import Step
from .target import Target

_COLORS = {1: "\033[38;5;39m", 2: "\033[38;5;44m", 3: "\033[38;5;43m"}   # accepted draft tokens by depth
_DEEP = "\033[38;5;214m"
_RESET = "\033[0m"


class TextStream:
    def __init__(self, target: Target):
        self.target = target
        self.ids: list[int] = []
        self.text = ""

    def _advance(self, tok: int) -> str:
        self.ids.append(tok)
        full = self.target.decode(self.ids)
        if full.endswith("\ufffd"):          # an incomplete multi-byte character: wait for more
            return ""
        new, self.text = full[len(self.text):], full
        return new

    def push(self, step: Step, color: bool = False) -> str:
        out = []
        for tok, src in zip(step.new_tokens, step.sources):
            piece = self._advance(tok)
            if color and piece and src.startswith(("draft@", "lookup@")):
                depth = int(src.split("@")[1])
                piece = f"{_COLORS.get(depth, _DEEP)}{piece}{_RESET}"
            out.append(piece)
        return "".join(out)

    def flush(self) -> str:
        full = self.target.decode(self.ids)
        new, self.text = full[len(self.text):], full
        return new
