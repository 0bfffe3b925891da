"""The analysis plots' shared frame: matplotlib's file backend, a folder that exists, save and close.

Public: pyplot, save.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import LorakitError


def pyplot(png: str | Path):
    """matplotlib.pyplot on the Agg backend (no display needed), once `png`'s folder is known to exist."""
    if not Path(png).parent.is_dir():
        raise LorakitError(f"cannot write the plot {png}: folder {Path(png).parent} does not exist; create it or "
                           "give another path")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save(fig, png: str | Path) -> Path:
    """Lay out, write and close `fig`; returns the file."""
    import matplotlib.pyplot as plt
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return Path(png)
