"""Where a benchmark keeps its results: one JSON file under --out, read back on a re-run so
that every benchmark resumes where it stopped."""

from __future__ import annotations

import json
import os
from pathlib import Path


def load_results(out: Path, name: str) -> tuple[Path, dict]:
    """The results file under out (the folder made), and what an earlier run left in it."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    return path, json.loads(path.read_text()) if path.exists() else {}


def save_results(out: Path, name: str, results) -> None:
    """Write the results under out and print them."""
    store_results(out, name, results)
    print(json.dumps(results, indent=1))


def store_results(out: Path, name: str, results) -> None:
    """Write the results under out as JSON; a kill leaves the old or the new file."""
    store_text(out, name, json.dumps(results, indent=1))


def store_text(out: Path, name: str, text: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    partial = out / f".{name}.partial"
    partial.write_text(text)
    os.replace(partial, out / name)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table of formatted cells; a column whose cells are all numbers aligns right."""
    def numeric(cell: str) -> bool:
        try:
            float(cell)
            return True
        except ValueError:
            return False

    align = ["---:" if rows and all(numeric(row[i]) for row in rows) else "---"
             for i in range(len(header))]
    lines = [header, align, *rows]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines) + "\n"
