"""Progress bars that stay readable in SLURM logs: frequent redraws on a terminal, a line every
30 s when output goes to a file."""
from __future__ import annotations

import sys

from tqdm import tqdm


def progress(total=None, desc: str = "", unit: str = "it", **kw) -> tqdm:
    tty = sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True,
                mininterval=0.5 if tty else 30.0, **kw)
