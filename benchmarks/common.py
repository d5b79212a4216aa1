"""Timing and memory helpers shared by the benchmarks.

Timings on a shared machine drift by 15% and more from one step to the next, so contenders
run interleaved (round robin, the order rotated every round) and each keeps the minimum of its
repetitions; ratios are only ever taken between contenders of the same run. Peak memory is
measured in a fresh process per contender (see :func:`measure_in_child`).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pointclora  # noqa: F401  (first: OpenMP's wait policy is set before torch loads)

# isort: split
import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
CHILD_FLAG = "--child"
# Every allocation of 64 KiB or more gets its own mmap and returns to the system when freed:
# the resident set then follows the live tensors instead of glibc's grown heap, so the peak
# RSS of a child process is a faithful peak of what the step needs.
CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}


def scanobjectnn_model(quick: bool = False) -> dict:
    """PointMAE keywords of the ScanObjectNN setting (full size), or a tiny smoke-run model."""
    if quick:
        return dict(cls_dim=15, num_group=32, group_size=16, depth=2)
    return dict(cls_dim=15, num_group=128, group_size=32)


def synthetic_data(clouds: int, npoints: int, seed: int = 0) -> dict:
    """``data:`` config of at least ``clouds`` synthetic training clouds in 15 classes."""
    return {"name": "synthetic", "num_classes": 15, "npoints": npoints, "seed": seed,
            "samples_per_class": -(-clouds // 15)}


def synthetic_batch(batch: int, npoints: int, device: torch.device, mode: str = "train",
                    seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch`` synthetic clouds through the ``mode`` transform, and their labels."""
    from pointclora.data import build_batch_transform, build_dataset

    data = synthetic_data(batch, npoints, seed)
    dataset = build_dataset(data, "train")
    points = torch.stack([dataset[i][0] for i in range(batch)])
    labels = torch.tensor([dataset[i][1] for i in range(batch)])
    gen = torch.Generator().manual_seed(seed)
    points = build_batch_transform(data, mode)(points, generator=gen)
    return points.to(device), labels.to(device)


def add_common_args(parser: argparse.ArgumentParser, repeats: int) -> None:
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i] (default cpu)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice, one per core)")
    parser.add_argument("--repeats", type=int, default=repeats,
                        help=f"timed repetitions per contender; the minimum is kept ({repeats})")
    parser.add_argument("--batch", type=int, default=None,
                        help="clouds per batch (default 8 on CPU, the official 32 on CUDA)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: tiny sizes, one repetition; results are not written")
    parser.add_argument("--out", type=Path, default=None,
                        help="Markdown output (default benchmarks/results/<name>.md)")


def setup(args: argparse.Namespace) -> torch.device:
    """Apply ``--threads``, check ``--device``, resolve the ``--batch`` and ``--repeats``
    defaults (``--quick``: batch 2, one repetition); returns the device."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: CUDA is not available on this machine")
    args.batch = args.batch or (2 if args.quick else 8 if device.type == "cpu" else 32)
    if args.quick:
        args.repeats = 1
    return device


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_description(device: torch.device) -> str:
    """One line: CPU model, cores, torch version and threads, GPU, load average."""
    parts = [f"CPU {cpu_model()} ({platform.machine()}), {os.cpu_count()} cores",
             f"torch {torch.__version__} with {torch.get_num_threads()} threads"]
    if device.type == "cuda":
        parts.append(f"GPU {torch.cuda.get_device_name(device)}")
    if hasattr(os, "getloadavg"):
        parts.append(f"load average {os.getloadavg()[0]:.1f} at start "
                     "(the machine is shared, so absolute times vary; ratios are side by side)")
    return "; ".join(parts)


def interleaved_times(contenders: dict[str, Callable[[], object]], repeats: int,
                      device: torch.device, warmup: int = 1,
                      log: Callable[[str], None] | None = print) -> dict[str, list[float]]:
    """Wall times (s) of each contender in ``repeats`` interleaved rounds.

    Round ``i`` runs the contenders in an order rotated by ``i``, so none always follows the
    same neighbour; ``warmup`` untimed rounds come first.
    """
    names = list(contenders)
    for _ in range(warmup):
        for name in names:
            contenders[name]()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(repeats):
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            sync(device)
            start = time.perf_counter()
            contenders[name]()
            sync(device)
            times[name].append(time.perf_counter() - start)
        if log:
            log(f"  round {i + 1}/{repeats}: " + ", ".join(
                f"{n} {times[n][-1] * 1e3:.0f}" for n in names) + " ms")
    return times


def interleaved_min(contenders: dict[str, Callable[[], object]], repeats: int,
                    device: torch.device, warmup: int = 1,
                    log: Callable[[str], None] | None = print) -> dict[str, float]:
    """Minimum wall time (s) of each contender over ``repeats`` interleaved rounds."""
    times = interleaved_times(contenders, repeats, device, warmup, log)
    return {name: min(ts) for name, ts in times.items()}


def _round_ratios(times: dict[str, list[float]], name: str, reference: str) -> list[float]:
    return [a / b for a, b in zip(times[name], times[reference], strict=True)]


def paired_ratio(times: dict[str, list[float]], name: str, reference: str) -> float:
    """Median over rounds of ``name``'s time over ``reference``'s in the same round: on a
    machine whose speed drifts, steadier than a ratio of minima."""
    return statistics.median(_round_ratios(times, name, reference))


def paired_ratio_interval(times: dict[str, list[float]], name: str, reference: str,
                          level: float = 0.95, resamples: int = 2000) -> tuple[float, float]:
    """Bootstrap interval (percentiles, fixed seed) of :func:`paired_ratio`: on this kind of
    machine the median of a dozen rounds still moves by a few percent from run to run, so a
    target a few percent away is only met where the whole interval is."""
    ratios = _round_ratios(times, name, reference)
    gen = random.Random(0)
    medians = sorted(statistics.median(gen.choices(ratios, k=len(ratios)))
                     for _ in range(resamples))
    tail = (1 - level) / 2
    return medians[int(tail * resamples)], medians[int((1 - tail) * resamples) - 1]


def ratio_text(times: dict[str, list[float]], name: str, reference: str) -> str:
    """``0.98 (0.95-1.01)``: the paired ratio and its 95% interval."""
    low, high = paired_ratio_interval(times, name, reference)
    return f"{paired_ratio(times, name, reference):.2f} ({low:.2f}-{high:.2f})"


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_bytes() -> int:
    """Current resident set size of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> bool:
    """Restart the resident-set high-water mark at the current RSS (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """High-water mark of the resident set of this process since the last reset."""
    hwm = _status_kib("VmHWM")
    if hwm is None:  # not Linux /proc: the high-water mark since the process started
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return hwm * 1024


class PeakMemory:
    """Peak memory of what runs inside the ``with`` block, in bytes (``.peak``).

    CUDA: ``torch.cuda.max_memory_allocated`` (tensors the caching allocator handed out).
    CPU: peak RSS of this process minus its RSS on entry, the high-water mark being reset on
    entry; run it in a fresh process (:func:`measure_in_child`) so that memory freed earlier
    but kept by the allocator does not hide part of the peak. Both count from the memory in use
    on entry; ``restart_peak()`` forgets the peak so far (e.g. transients of building a model)
    but still counts what is in use then.
    """

    def __init__(self, device: torch.device):
        self.device, self.peak = device, 0

    def __enter__(self) -> PeakMemory:
        self.start = self.restart_peak()
        return self

    def restart_peak(self) -> int:
        """Restart the high-water mark at the memory now in use; returns that amount."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return torch.cuda.memory_allocated(self.device)
        if not reset_peak_rss():
            raise RuntimeError("cannot reset the peak RSS (/proc/self/clear_refs): peak memory "
                               "on CPU needs Linux")
        return rss_bytes()

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.start
        else:
            self.peak = peak_rss_bytes() - self.start


def measure_in_child(script: Path, args: Sequence[str]) -> dict:
    """Run ``script --child ARGS`` in a fresh interpreter; it prints one JSON line last."""
    env = {**os.environ, **CHILD_ENV}
    proc = subprocess.run([sys.executable, str(script), CHILD_FLAG, *args], env=env,
                          capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        raise RuntimeError(f"{script.name} {CHILD_FLAG} {' '.join(args)} failed:\n"
                           f"{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def contender_args(argv: list[str]) -> tuple[str, int, torch.device, bool]:
    """In a child process: the contender, batch size, device and ``--quick`` flag that
    :func:`measure_contenders` sent; applies the parent's thread count."""
    contender, batch, device, threads, quick = json.loads(argv[0])
    torch.set_num_threads(threads)
    return contender, batch, torch.device(device), quick


def measure_contenders(script: Path, names: Sequence[str], args: argparse.Namespace,
                       device: torch.device) -> dict[str, dict]:
    """The JSON result of ``script``'s child for each contender, its peak printed as it comes;
    the child reads its arguments with :func:`contender_args`."""
    results = {}
    for name in names:
        spec = json.dumps([name, args.batch, str(device), torch.get_num_threads(), args.quick])
        results[name] = measure_in_child(script, [spec])
        print(f"  peak memory {name}: {results[name]['peak'] / 2**20:.0f} MiB")
    return results


def with_busy(count: int, run: Callable[[], object]):
    """``run()`` while ``count`` other processes each keep one core busy (a busy neighbour)."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        return run()
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]],
                   align: str | None = None) -> str:
    """A GitHub table; ``align`` is one letter per column (l or r), default: first left."""
    align = align or "l" + "r" * (len(headers) - 1)
    rule = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(map(str, headers)) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines)


def report(name: str, text: str, args: argparse.Namespace) -> None:
    """Print the result and write it to ``benchmarks/results/<name>.md`` (not for --quick)."""
    print("\n" + text)
    if args.quick and args.out is None:
        return
    out = args.out or RESULTS / f"{name}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text.rstrip() + "\n")
    print(f"\nwritten to {out}")


def command_line() -> str:
    return "python " + " ".join([Path(sys.argv[0]).as_posix().split(f"{ROOT.name}/")[-1],
                                 *sys.argv[1:]])
