"""The one markdown table writer: the demo's tables, `kd report`'s index and the neighbour tables use it."""
from __future__ import annotations

from typing import Any, Iterable, Sequence


def markdown_table(rows: Iterable[dict[str, Any]], cols: Sequence[tuple[str, str, str]]) -> str:
    """A markdown table; ``cols`` are (key in each row, header, format spec: "" for str())."""
    head = "| " + " | ".join(h for _, h, _ in cols) + " |"
    sep = "|" + "|".join("---" for _ in cols) + "|"
    body = ["| " + " | ".join(format(r[k], f) for k, _, f in cols) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def frame_table(df) -> str:
    """A pandas DataFrame as a markdown table, each cell as str() gives it."""
    return markdown_table(df.to_dict("records"), [(str(c), str(c), "") for c in df.columns])
