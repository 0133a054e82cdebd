"""Result tables: print with rich, write CSV and JSON atomically."""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

from mixprec.io_utils import write_text_atomic


def write_csv(path: str | os.PathLike[str], rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    """Write ``rows`` (dicts with exactly ``columns``) as CSV."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, buffer.getvalue())


def write_json(path: str | os.PathLike[str], payload: Any) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2) + "\n")


def print_table(title: str, rows: Sequence[dict[str, Any]], columns: Sequence[str],
                console: Console | None = None) -> None:
    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify="left" if column in ("precision", "policy", "path") else "right")
    for row in rows:
        table.add_row(*(_fmt(row[c]) for c in columns))
    (console or Console(width=160)).print(table)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)
