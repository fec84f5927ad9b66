"""Helpers shared by the browser tests (test_e2e, test_studio_story)."""
from __future__ import annotations

import re
import time
from collections.abc import Callable


def text_of(pg, selector: str) -> str:
    """The first match's visible text ('' when nothing matches yet)."""
    loc = pg.locator(selector)
    return loc.first.inner_text() if loc.count() else ""


def title_of(pg, elem: str) -> str:
    """The title of Plotly figure `#elem` ('' before the figure is drawn)."""
    loc = pg.locator(f"#{elem} .gtitle")
    return (loc.first.text_content() or "") if loc.count() else ""


def _poll(pg, read: Callable[[], str], pattern: str, timeout: float, poll_ms: int, what: str) -> str:
    t0 = time.time()
    text = ""
    while time.time() - t0 < timeout:
        text = read()
        if re.search(pattern, text):
            return text
        pg.wait_for_timeout(poll_ms)
    raise AssertionError(f"{what} never matched {pattern!r} (last: {text[:400]!r})")


def wait_text(pg, selector: str, pattern: str, timeout: float = 30, poll_ms: int = 100) -> str:
    """Wait until the text of `selector` matches `pattern`; the assertion says what it last was."""
    return _poll(pg, lambda: text_of(pg, selector), pattern, timeout, poll_ms, selector)


def wait_title(pg, elem: str, pattern: str, timeout: float = 30, poll_ms: int = 100) -> str:
    """Wait until figure `#elem`'s title matches `pattern`: Plotly draws a figure after the
    text beside it has arrived, so a title read at once can be empty or the previous one."""
    return _poll(pg, lambda: title_of(pg, elem), pattern, timeout, poll_ms, f"#{elem}'s title")
