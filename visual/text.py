"""Token text for plot labels: whitespace made visible, Plotly's HTML-like markup escaped."""
from __future__ import annotations

import unicodedata

# Whitespace a reader cannot see in a plot label gets a visible stand-in.
WHITESPACE_GLYPHS: dict[str, str] = {" ": "␣", "\n": "⏎", "\t": "⇥", "\r": "␍", "\u00a0": "⍽"}
EMPTY_GLYPH = "∅"


def visible_token(text: str, max_len: int | None = None) -> str:
    """Token text with spaces, newlines, tabs and control characters visible (so ' the',
    'the' and '\\n' look different in a label), optionally cut to `max_len` characters."""
    out = []
    for ch in text:
        if ch in WHITESPACE_GLYPHS:
            out.append(WHITESPACE_GLYPHS[ch])
        elif unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp"):
            out.append(f"\\x{ord(ch):02x}" if ord(ch) < 256 else f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    s = "".join(out) or EMPTY_GLYPH
    if max_len is not None and len(s) > max_len:
        s = s[:max(1, max_len - 1)] + "…"
    return s


def plotly_escape(text: str) -> str:
    """Escape &, < and > so Plotly renders them literally instead of as its text markup."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def label(text: str, max_len: int | None = None) -> str:
    """A token as a safe, visible Plotly label."""
    return plotly_escape(visible_token(text, max_len))
