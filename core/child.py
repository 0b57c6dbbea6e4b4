"""Work in a child process whose last line of stdout is one JSON object: timings that must not share a process
(a bandwidth probe's buffer, two artifacts that do not fit together, torch beside TVM)."""

from __future__ import annotations

import json
import subprocess

from .errors import GptjError


def run_json(command: list[str], env: dict | None = None, what: str = "a child process") -> dict:
    """The child's last stdout line, parsed; GptjError with the last line of its stderr if it fails."""
    done = subprocess.run([str(part) for part in command], capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        raise GptjError(f"{what} failed: {(done.stderr.strip().splitlines() or ['exit %d' % done.returncode])[-1]}")
    lines = done.stdout.strip().splitlines()
    try:
        return json.loads(lines[-1])
    except (IndexError, ValueError):
        raise GptjError(f"{what} printed no JSON line") from None
