"""Peak resident-set growth of this process while a function runs (psutil, sampled by a thread):
the memory tests' probe. (No tests here.)"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import psutil


def peak_rss_during(fn: Callable[[], Any], every_s: float = 0.01) -> tuple[Any, int]:
    """(fn(), peak RSS growth in bytes over the RSS before the call), sampled every `every_s`
    seconds."""
    proc, done = psutil.Process(), threading.Event()
    base = peak = proc.memory_info().rss

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, proc.memory_info().rss)
            done.wait(every_s)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        out = fn()
    finally:
        done.set()
        t.join()
    return out, peak - base
