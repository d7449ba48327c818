"""The markdown table every benchmark script prints (rows of dicts, columns (key, title, digits))."""
from __future__ import annotations


def fmt(v, digits=3):
    return "-" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def table(rows: list[dict], cols: list[tuple[str, str, int]]) -> str:
    head = "| " + " | ".join(c[1] for c in cols) + " |"
    sep = "|" + "|".join("---" for _ in cols) + "|"
    body = ["| " + " | ".join(fmt(r.get(c[0]), c[2]) for c in cols) + " |" for r in rows]
    return "\n".join([head, sep, *body])
