"""Helpers shared by the browser tests (test_e2e, test_studio_story)."""
from __future__ import annotations

import re
import time


def text_of(pg, selector: str) -> str:
    """The first match's visible text ('' when nothing matches yet)."""
    loc = pg.locator(selector)
    return loc.first.inner_text() if loc.count() else ""


def wait_text(pg, selector: str, pattern: str, timeout: float = 30, poll_ms: int = 100) -> str:
    """Wait until the text of `selector` matches `pattern`; the assertion says what it last was."""
    t0 = time.time()
    text = ""
    while time.time() - t0 < timeout:
        text = text_of(pg, selector)
        if re.search(pattern, text):
            return text
        pg.wait_for_timeout(poll_ms)
    raise AssertionError(f"{selector} never matched {pattern!r} (last: {text[:400]!r})")


def title_of(pg, elem: str) -> str:
    """The title of Plotly figure `#elem` ('' before the figure is drawn)."""
    loc = pg.locator(f"#{elem} .gtitle")
    return (loc.first.text_content() or "") if loc.count() else ""


def wait_title(pg, elem: str, pattern: str, timeout: float = 30, poll_ms: int = 100) -> str:
    """Wait until figure `#elem`'s title matches `pattern`: Plotly draws a figure after the
    text beside it has arrived, so a title read at once can be empty or the previous one."""
    t0 = time.time()
    title = ""
    while time.time() - t0 < timeout:
        title = title_of(pg, elem)
        if re.search(pattern, title):
            return title
        pg.wait_for_timeout(poll_ms)
    raise AssertionError(f"#{elem}'s title never matched {pattern!r} (last: {title!r})")
