"""Shared helpers of the attention and layer benchmarks: isolated worker processes, peak memory, timing, tables.

Every measurement (one method at one length) runs in its own process, so that its peak memory is its own: the
kernel's high-water mark of resident memory is reset just before the timed call (``/proc/self/clear_refs``) and read
after it. A process that runs out of memory costs that one cell of the table, not the run.
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


def tensor_bytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


# -- timing ------------------------------------------------------------------------------------------------------


def measure(step, *, budget_s: float = 6.0, max_reps: int = 5) -> dict:
    """Run ``step`` once for peak memory (growth of resident memory over the run), then as many timed repeats as
    fit in ``budget_s`` (at least one, at most ``max_reps``). The first, memory run is not timed."""
    import gc

    gc.collect()
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


def matmul_rate(threads: int, size: int = 2048, reps: int = 7) -> float:
    """Best fp32 FLOP/s of a (size x size) @ (size x size) matmul."""
    import torch

    set_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


# -- workers -----------------------------------------------------------------------------------------------------


def run_worker(script: str, args: dict, timeout: float = 900) -> dict:
    """Run ``script --worker '<json args>'`` in a fresh process; its last stdout line is the JSON result."""
    command = [sys.executable, script, "--worker", json.dumps(args)]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": "timeout"}
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["?"]
        return {"error": f"exit {done.returncode}: {tail[0][:200]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def worker_main(handler) -> bool:
    """If this process is a worker, run ``handler(args)`` and print its JSON result; returns True if it was."""
    if len(sys.argv) >= 3 and sys.argv[1] == "--worker":
        args = json.loads(sys.argv[2])
        set_threads(args["threads"])
        print(json.dumps(handler(args)))
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
