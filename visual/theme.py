"""The shared look of every figure: a clean light theme, fixed heights for a side panel and
a `uirevision`, so Gradio's updates keep the user's zoom and legend choices.

Speed matters: the studio redraws its panels while an answer streams, in the same process as
the decoder. Plotly's stock templates are large (every trace type's defaults, colour scales,
polar / geo / 3-D axes) and are validated and deep-copied for every figure: applying
"plotly" at `go.Figure()` and then "plotly_white" cost about 20 ms per figure, more than
everything else a figure does. THEME is the part of "plotly_white" these figures use; it is
registered once and made plotly's default template, so a new figure costs well under a
millisecond to start and its JSON is smaller.
"""
from __future__ import annotations

import plotly.graph_objects as go
import plotly.io as pio

from .colors import INK, PAPER

PANEL_HEIGHT = 340          # px; charts in the side panel
FONT = "Inter, 'Segoe UI', Helvetica, Arial, sans-serif"
TEMPLATE = "hass_studio"

_GRID = "#EBF0F8"
_AXIS = {"gridcolor": _GRID, "linecolor": _GRID, "zerolinecolor": _GRID, "zerolinewidth": 2, "ticks": "",
         "automargin": True, "title": {"standoff": 15}}
THEME = go.layout.Template(layout={
    "autotypenumbers": "strict", "hovermode": "closest", "hoverlabel": {"align": "left"},
    "paper_bgcolor": PAPER, "plot_bgcolor": PAPER, "font": {"color": INK}, "xaxis": _AXIS, "yaxis": _AXIS,
    "colorway": ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#6E6E6E"],
    "annotationdefaults": {"arrowcolor": INK, "arrowhead": 0, "arrowwidth": 1},
    "shapedefaults": {"line": {"color": INK}},
})
pio.templates[TEMPLATE] = THEME
pio.templates.default = TEMPLATE


def apply_theme(fig: go.Figure, title: str, height: int = PANEL_HEIGHT, uirevision: str = "hass") -> go.Figure:
    """Style `fig` in place and return it."""
    if pio.templates.default != TEMPLATE:      # someone changed plotly's default after import
        fig.update_layout(template=TEMPLATE)
    fig.update_layout(
        title={"text": title, "x": 0.01, "xanchor": "left", "font": {"size": 14}},
        font={"family": FONT, "size": 11, "color": INK},
        height=height,
        autosize=True,
        margin={"l": 48, "r": 16, "t": 44, "b": 48},
        paper_bgcolor=PAPER,
        plot_bgcolor=PAPER,
        # below the x-axis title: a fixed ~58 px, whatever the figure's height (legend y is in plot heights)
        legend={"orientation": "h", "yanchor": "top", "y": -min(0.4, 58 / max(height - 92, 100)), "x": 0,
                "font": {"size": 10}},
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
