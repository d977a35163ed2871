"""The psc-nas dashboard page: an HTML template, its style and its script (plotly.js draws).

Kept as plain files so the page can be read and edited as a page; ``psc_nas.dashboard`` fills the
template, serves it, and writes the offline snapshot. Shipped as package data (pyproject.toml).
"""

from importlib.resources import files


def asset(name: str) -> str:
    """Text of one of the page's files: ``index.html``, ``dashboard.css``, ``dashboard.js``."""
    return (files(__name__) / name).read_text(encoding="utf-8")
