"""Answers as Markdown (the chat with token colouring off): headings, lists, tables and code
blocks, with every bit of raw HTML in the model's output shown as text, never run.

markdown-it-py is in requirements.txt (Gradio brings it too). Images are not rendered (an
answer must not make the visitor's browser fetch addresses the model made up); links keep
markdown-it's check that refuses javascript:, vbscript:, file: and data: targets.
"""
from __future__ import annotations

from functools import lru_cache

from markdown_it import MarkdownIt


@lru_cache(maxsize=1)
def _parser() -> MarkdownIt:
    md = MarkdownIt("commonmark", {"html": False, "breaks": True, "typographer": False})
    md.enable(["table", "strikethrough"])
    md.disable("image")
    return md


def markdown_html(text: str) -> str:
    """`text` rendered as Markdown inside `<div class="hs-md">`; raw HTML is escaped."""
    body = _parser().render(text)
    body = body.replace("<a href=", '<a target="_blank" rel="noopener noreferrer nofollow" href=')
    return f'<div class="hs-md">{body}</div>'


__all__ = ["markdown_html"]
