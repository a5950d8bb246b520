"""Matplotlib on the non-interactive Agg backend, and figures as PNG bytes (for atomic writes)."""
from __future__ import annotations

import io


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (PNG files only, no display needed)."""
    import matplotlib  # lazy: a second of start-up that commands without pictures do not pay

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after choosing the backend

    return plt


def figure_png(fig, dpi: int) -> bytes:
    """The figure as PNG bytes (for an atomic write); the figure is closed."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    pyplot().close(fig)
    return buffer.getvalue()
