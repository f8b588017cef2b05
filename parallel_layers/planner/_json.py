"""JSON for the planner's dataclasses (hardware specs, model profiles): save, and load from a
path or from the text itself."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

__all__ = ["dump", "load"]


def dump(obj: Any, path: str | Path | None = None) -> str:
    """``obj`` (a dataclass) as indented JSON text, also written to ``path`` when given."""
    text = json.dumps(asdict(obj), indent=2)
    if path is not None:
        Path(path).write_text(text + "\n")
    return text


def load(text_or_path: str | Path) -> dict:
    """The dict of JSON text, or of the file at ``text_or_path``."""
    text = str(text_or_path)
    if not text.lstrip().startswith("{"):
        text = Path(text_or_path).read_text()
    return json.loads(text)
