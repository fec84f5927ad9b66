"""The shared look of every figure: a clean light theme, fixed heights for a side panel and
a `uirevision`, so Gradio's updates keep the user's zoom and legend choices."""
from __future__ import annotations

import plotly.graph_objects as go

from .colors import INK, PAPER

PANEL_HEIGHT = 340          # px; charts in the side panel
FONT = "Inter, 'Segoe UI', Helvetica, Arial, sans-serif"


def apply_theme(fig: go.Figure, title: str, height: int = PANEL_HEIGHT, uirevision: str = "hass") -> go.Figure:
    """Style `fig` in place and return it."""
    fig.update_layout(
        template="plotly_white",
        title={"text": title, "x": 0.01, "xanchor": "left", "font": {"size": 14}},
        font={"family": FONT, "size": 11, "color": INK},
        height=height,
        autosize=True,
        margin={"l": 48, "r": 16, "t": 44, "b": 40},
        paper_bgcolor=PAPER,
        plot_bgcolor=PAPER,
        legend={"orientation": "h", "yanchor": "top", "y": -0.14, "x": 0, "font": {"size": 10}},
        hoverlabel={"font": {"family": FONT, "size": 11}, "align": "left"},
        uirevision=uirevision,
    )
    return fig


def empty_figure(message: str, title: str = "", height: int = PANEL_HEIGHT, uirevision: str = "hass") -> go.Figure:
    """A themed figure that says why it is empty (no data yet, a plain step, ...)."""
    fig = go.Figure()
    fig.add_annotation(text=message, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper",
                       font={"size": 13, "color": "#555555"})
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return apply_theme(fig, title, height, uirevision)
