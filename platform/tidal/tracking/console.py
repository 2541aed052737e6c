"""Console output: the end-of-run summary table."""
from __future__ import annotations

from typing import Dict


def print_summary(title: str, summary: Dict) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column("what", style="bold")
    table.add_column("value", overflow="fold")
    for k, v in summary.items():
        if isinstance(v, (list, dict)) and not v:
            continue  # e.g. no rollbacks, no skipped checkpoints
        if isinstance(v, float):
            if k.endswith("_s"):
                v = f"{v:,.1f}" if v >= 10 else f"{v:.3f}"
            else:
                v = f"{v:,.1f}" if abs(v) >= 100 else f"{v:,.4f}"
        elif isinstance(v, int):
            v = f"{v:,}"
        table.add_row(k.replace("_", " "), escape(str(v)))  # paths and overrides hold [...]
    Console().print(table)
