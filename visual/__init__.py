"""Plotly figures and HTML for HASS Studio: pure functions of `hass.events` step events.

Imports only plotly and `hass.events` (never torch, gradio or other hass modules), so the
app, the preview and the tests can draw any stored run.
"""
from .charts import (accept_length_figure, batch_heatmap, depth_acceptance_figure, pass_accuracy_figure,
                     speed_words, speedup_figure, speedup_title, speedups, time_split_figure, training_figure)
from .colors import COLOR_TABLE, legend_html, series_colors, source_color
from .highlight import HIGHLIGHT_CSS, highlight_html
from .text import visible_token
from .tree import ancestor_mask, mask_figure, node_roles, tree_figure, tree_positions

__all__ = [
    "tree_figure", "mask_figure", "tree_positions", "ancestor_mask", "node_roles",
    "depth_acceptance_figure", "pass_accuracy_figure", "speed_words", "speedup_figure", "speedups", "speedup_title",
    "time_split_figure",
    "accept_length_figure", "training_figure", "batch_heatmap",
    "highlight_html", "HIGHLIGHT_CSS", "legend_html", "COLOR_TABLE", "series_colors", "source_color",
    "visible_token",
]
