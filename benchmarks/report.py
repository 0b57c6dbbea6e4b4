"""What every benchmark script ends with: its result as JSON under benchmarks/results/ (or --out)."""

from __future__ import annotations

import json
from pathlib import Path


def write_result(result: dict, path) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
