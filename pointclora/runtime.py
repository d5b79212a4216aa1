"""OpenMP threads that sleep when idle, so training on a busy shared CPU stays fast.

By default OpenMP worker threads spin for a while after each parallel region. When another
process holds one of the cores, the spinning threads and the descheduled one wait on each
other at every barrier, and a training epoch gets 12-17x slower (measured on a 2-core
host; `benchmarks/bench_contention.py`). With `OMP_WAIT_POLICY=PASSIVE` idle threads sleep
instead; the price is paid on an idle machine by models as small as the demo's, whose many
small operators each wake the other threads (README, Shared machines: 2.6 s against 1.4 s
per demo epoch, against 24.5 s for spinning threads beside a busy process).

OpenMP reads its environment once, when torch loads it, so `configure()` runs on
`import pointclora` and at the top of every tool, before torch is imported:

- a value the user set wins (`OMP_WAIT_POLICY=ACTIVE python tools/train.py ...`);
- `POINTCLORA_OMP_DEFAULTS=0` leaves the OpenMP environment entirely alone;
- when torch was imported first, the wait policy can no longer change, so the number of
  torch threads is lowered to the CPUs not already busy (`free_cpus`), with a warning.
"""
from __future__ import annotations

import os
import sys
import warnings

OMP_DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE"}
SWITCH = "POINTCLORA_OMP_DEFAULTS"


def enabled() -> bool:
    return os.environ.get(SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


def free_cpus(cpus: int, load: float) -> int:
    """CPUs left for this process: the usable ones minus those busy by the load average."""
    return max(1, min(cpus, cpus - int(load + 0.5)))


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def configure() -> None:
    """Set the OpenMP defaults before torch loads; otherwise fit the thread count to the load."""
    if not enabled() or all(key in os.environ for key in OMP_DEFAULTS):
        return
    if "torch" not in sys.modules:
        for key, value in OMP_DEFAULTS.items():
            os.environ.setdefault(key, value)
        return
    if "OMP_NUM_THREADS" in os.environ or not hasattr(os, "getloadavg"):
        return
    import torch

    free = free_cpus(_usable_cpus(), os.getloadavg()[0])
    if free < torch.get_num_threads():
        warnings.warn(
            f"torch was imported before pointclora, so OpenMP threads spin while waiting; "
            f"on this busy machine that is much slower. Using {free} of "
            f"{torch.get_num_threads()} threads. Import pointclora first or set "
            "OMP_WAIT_POLICY=PASSIVE before starting Python (README, Shared machines).",
            RuntimeWarning, stacklevel=3)
        torch.set_num_threads(free)
