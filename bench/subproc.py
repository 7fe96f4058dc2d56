"""Run a Python snippet in a fresh process and collect what it `emit()`s (its own time and peak RSS)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

BENCH = os.path.dirname(os.path.abspath(__file__))
PRELUDE = f"""
import json, os, sys
sys.path.insert(0, {BENCH!r})
_proto = os.fdopen(os.dup(1), "w")
os.dup2(2, 1)
def emit(**kw):
    _proto.write(json.dumps(kw) + "\\n"); _proto.flush()
"""


def run_child(code: str, env: dict | None = None) -> dict:
    """Run `code` (which calls emit(...) once) in a child interpreter; returns the emitted dict."""
    p = subprocess.run([sys.executable, "-c", PRELUDE + code], stdout=subprocess.PIPE, text=True,
                       env={**os.environ, **(env or {})})
    if p.returncode:
        raise RuntimeError(f"benchmark child failed with exit code {p.returncode}")
    return json.loads(p.stdout.strip().splitlines()[-1])
