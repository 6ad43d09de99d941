"""Shared helpers of the attention and layer benchmarks: isolated worker processes, peak memory, timing, tables.

Each method runs in its own process, lengths in increasing order, so that peak memory is its own: the kernel's
high-water mark of resident memory is reset just before a forward + backward (``/proc/self/clear_refs``) and read
after it, and glibc first returns every free page to the system (``malloc_trim``), so what an earlier length freed
cannot be silently reused by the next. A process that dies (out of memory) costs the rest of its row.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


# -- memory ------------------------------------------------------------------------------------------------------


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def resident_bytes() -> int:
    return _status("VmRSS")


def reset_peak() -> None:
    """Reset the process's resident high-water mark (VmHWM) to its current size (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_bytes() -> int:
    return _status("VmHWM")


def release_free_memory() -> None:
    """Give the heap's free pages back to the system, so a later allocation shows up as resident growth."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass


def tensor_bytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


# -- timing ------------------------------------------------------------------------------------------------------


def measure(step, *, budget_s: float = 6.0, max_reps: int = 5) -> dict:
    """Run ``step`` once for peak memory (growth of resident memory over the run), then as many timed repeats as
    fit in ``budget_s`` (at least one, at most ``max_reps``). The first, memory run is not timed."""
    import gc

    gc.collect()
    release_free_memory()
    before = resident_bytes()
    reset_peak()
    start = time.perf_counter()
    step()
    first = time.perf_counter() - start
    growth = max(0, peak_bytes() - before)
    reps = max(1, min(max_reps, int(budget_s / max(first, 1e-3))))
    times = []
    for _ in range(reps):
        gc.collect()
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"growth_bytes": growth, "times": times, "min_s": min(times), "median_s": statistics.median(times)}


def best_seconds(fn, reps: int) -> float:
    """Best wall time of ``fn()`` over ``reps`` calls, after one untimed warm-up call."""
    fn()
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def matmul_rate(threads: int, size: int = 2048, reps: int = 7) -> float:
    """Best fp32 FLOP/s of a (size x size) @ (size x size) matmul."""
    import torch

    set_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    return 2 * size**3 / best_seconds(lambda: a @ b, reps)


# -- workers -----------------------------------------------------------------------------------------------------


# glibc settings that keep freed memory in the process instead of handing it back to the system (mallopt(3); read
# when a process starts). On machines where the system reclaims returned pages eagerly (a VM with free-page
# reporting, as here: page_reporting.page_reporting_order on the kernel command line), every large temporary freed
# and allocated again costs fresh page faults, which land on whichever op touches the memory first. A 4 GiB mmap
# threshold serves large tensors from the heap, and a 64 GiB trim threshold keeps the heap's free top. Measured on
# one causal layer at 2 threads (bench_layer.py): time(16384) / time(4096) 7.6 by default, 4.0 with these.
# PyTorch's CPU tuning guide gets the same effect from jemalloc or tcmalloc (LD_PRELOAD).
KEEP_FREED_MEMORY = {
    "MALLOC_MMAP_THRESHOLD_": str(4 * 2**30),
    "MALLOC_TRIM_THRESHOLD_": str(64 * 2**30),
    "MALLOC_TOP_PAD_": str(2**30),
}


def run_worker(script: str, common: dict, cells: list[dict], timeout: float = 1800,
               extra_env: dict | None = None) -> list[dict | None]:
    """Run ``script --worker`` in a fresh process on ``cells`` (each merged into ``common``); the worker prints one
    JSON line per cell as it finishes. Cells after a crash come back as None. ``extra_env``: variables set in the
    worker's environment (``KEEP_FREED_MEMORY``)."""
    command = [sys.executable, script, "--worker", json.dumps({"common": common, "cells": cells})]
    env = dict(os.environ, PYTHONWARNINGS="ignore", **(extra_env or {}))
    # OpenMP's wait policy is left as the user's environment has it (libgomp's default: spin a while, then sleep).
    # Forcing PASSIVE (sleep at once), as these benchmarks once did against noise on a shared machine, made every
    # parallel region pay a wake-up: the causal op has many small ones and ran slower at 2 threads than at 1
    # (N=4096 forward + backward: 228 ms at 2 threads vs 200 at 1 with PASSIVE; 104 ms at 2 threads by default).
    results: list[dict | None] = []
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) as proc:
        start = time.time()
        for line in proc.stdout:
            result = json.loads(line)
            results.append(result)
            print(f"    {result.get('label', '?')}: {result.get('min_s', float('nan')):.3f} s", file=sys.stderr,
                  flush=True)
            if time.time() - start > timeout:
                proc.kill()
                break
        error = proc.stderr.read().strip().splitlines()[-1:] if proc.wait() else []
    if error:
        print(f"    worker stopped: {error[0][:200]}", file=sys.stderr)
    return results + [None] * (len(cells) - len(results))


def worker_main(handler) -> bool:
    """If this process is a worker, run ``handler(args)`` on each cell and print one JSON line per cell."""
    if len(sys.argv) >= 3 and sys.argv[1] == "--worker":
        payload = json.loads(sys.argv[2])
        set_threads(payload["common"]["threads"])
        for cell in payload["cells"]:
            args = {**payload["common"], **cell}
            print(json.dumps({"label": cell.get("label", ""), **handler(args)}), flush=True)
        return True
    return False


# -- output ------------------------------------------------------------------------------------------------------


def markdown_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---:" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(value, spec: str = ".0f", missing: str = "—") -> str:
    return missing if value is None else format(value, spec)


def machine_line(threads: int, rate: float) -> str:
    import platform

    import torch

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{threads} threads, fp32 matmul {rate / 1e9:.0f} GFLOP/s (2048^2, best of 7), load average {load:.1f} "
        "when the run started"
    )


# -- contention ---------------------------------------------------------------------------------------------------


def thread_settings(thread_counts: list[int] | None, busy_core: int | None) -> list[tuple[str, int, int | None]]:
    """(name, threads, busy core) per setting to measure: each thread count (default: 1 and torch's default), then
    torch's default beside a busy-loop process on ``busy_core`` when one is given (``BusyCore``)."""
    import torch

    default = torch.get_num_threads()
    settings = [(f"{t} thread{'s' if t > 1 else ''}", t, None) for t in (thread_counts or sorted({1, default}))]
    if busy_core is not None:
        settings.append((f"{default} thread{'s' if default > 1 else ''}, core {busy_core} busy", default, busy_core))
    return settings


class BusyCore:
    """A busy-loop process pinned to one core (``os.sched_setaffinity``) while the ``with`` block runs: what the
    measured op sees when another program holds a core (the contended case of issue 16). core None: no-op."""

    def __init__(self, core: int | None):
        self.core, self.process = core, None

    def __enter__(self):
        if self.core is not None:
            spin = f"import os\nos.sched_setaffinity(0, {{{self.core}}})\nwhile True:\n    pass\n"
            self.process = subprocess.Popen([sys.executable, "-c", spin])
            time.sleep(0.2)  # let it start spinning
        return self

    def __exit__(self, *exc):
        if self.process is not None:
            self.process.kill()
            self.process.wait()
