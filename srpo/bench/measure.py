"""Measuring instruments of the benchmark: wall time, peak memory, FLOPs, and the curve readings
(time to a target, a value at an equal gain). Nothing here knows about algorithms."""

from __future__ import annotations

import contextlib
import ctypes
import statistics
import time

import torch


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device="cpu", repeats: int = 3, warmup: int = 1) -> float:
    """Median wall seconds of ``fn()`` over ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def timed_together(fns: dict, device="cpu", repeats: int = 3, warmup: int = 1) -> dict:
    """Median wall seconds of each function, measured in interleaved rounds (one call of each per
    round) so that a machine whose load drifts weighs on all of them alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def status_kb(field: str) -> int:
    """A field of /proc/self/status in KiB (VmRSS: resident now, VmHWM: its peak)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"no {field} in /proc/self/status")


def _trim() -> None:
    """Give freed heap pages back to the OS so the next peak starts from what is really in use."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def reset_peak(trim: bool = True) -> None:
    """Start a new resident-set peak: VmHWM := VmRSS (after giving freed heap pages back)."""
    if trim:
        _trim()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_memory(fn, device="cpu") -> float:
    """Peak memory ``fn()`` adds, in MiB: CUDA peak allocated on a GPU; on a CPU the process's peak
    resident set (VmHWM, reset through /proc/self/clear_refs) minus the resident set before."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    reset_peak()
    base = status_kb("VmRSS")
    fn()
    return (status_kb("VmHWM") - base) / 1024


class _Saved:
    """A tensor saved for backward, counted while autograd holds it."""

    def __init__(self, tensor, live):
        self.tensor, self.live, self.size = tensor, live, tensor.numel() * tensor.element_size()
        live[0] += self.size
        live[1] = max(live[1], live[0])

    def __del__(self):
        self.live[0] -= self.size


def saved_activations(fn) -> float:
    """Peak MiB of tensors autograd holds for backward passes during ``fn()`` (outside
    checkpointed regions, whose inputs only are counted): the activation memory of training."""
    live = [0, 0]  # bytes held now, peak
    with torch.autograd.graph.saved_tensors_hooks(lambda t: _Saved(t, live), lambda s: s.tensor):
        fn()
    return live[1] / 2**20


def flops(fn) -> float:
    """FLOPs of the matrix products and convolutions of ``fn()``, forward and backward
    (``torch.utils.flop_counter``)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


# ---- curve readings ----------------------------------------------------------------------------

def time_to_target(curve: list[dict], key: str, target: float, cost: str = "seconds") -> float | None:
    """Cumulative ``cost`` at the first point of ``curve`` (ordered by update) whose ``key`` reaches
    ``target``; ``None`` if it never does. Each point carries the cumulative cost up to it."""
    for point in curve:
        if point[key] >= target:
            return point[cost]
    return None


def best_within(curve: list[dict], key: str, budget: float, cost: str = "seconds") -> float:
    """Best ``key`` among the points whose cumulative ``cost`` is within ``budget``."""
    return max(p[key] for p in curve if p[cost] <= budget * (1 + 1e-9))


def value_at_gain(curve: list[dict], gain_key: str, gain: float, value_key: str) -> float | None:
    """``value_key`` where ``gain_key - curve[0][gain_key]`` first reaches ``gain``, linearly
    interpolated between the two points around the crossing; ``None`` if never reached."""
    start = curve[0][gain_key]
    prev = curve[0]
    for point in curve:
        g = point[gain_key] - start
        if g >= gain:
            g0 = prev[gain_key] - start
            w = 1.0 if g == g0 else (gain - g0) / (g - g0)
            return prev[value_key] + w * (point[value_key] - prev[value_key])
        prev = point
    return None
