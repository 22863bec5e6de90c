"""Memory measured in a process of its own (tests/test_wan_decode.py, tests/test_qwen_decode.py):
its allocator hands every block over 64 KiB back at its free (``MALLOC_MMAP_THRESHOLD_``), so
that its resident peak follows the live tensors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def measured(module: str, call: str) -> dict:
    """``module.call`` (e.g. ``decode_memory(256)``, a function of a test module returning a
    JSON-able dict) run in a fresh one-thread Python, its result."""
    code = f"import json, sys; sys.path.insert(0, 'tests'); import {module} as m; print(json.dumps(m.{call}))"
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parent.parent)
    return json.loads(run.stdout.strip().splitlines()[-1])
