"""What every benchmark does with its numbers at the end: write them as JSON next to its table.

Imported by the scripts in this folder (run as ``python benchmarks/<name>.py``, so the folder is
on ``sys.path``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def config_of(args: argparse.Namespace) -> dict[str, Any]:
    """The command-line options as JSON-ready values (paths as strings)."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}


def write_results(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` as indented JSON (parents created) and say where."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str))
    print(f"wrote {path}")
