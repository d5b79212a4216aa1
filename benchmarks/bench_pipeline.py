"""Throughput of the whole evaluation pipeline, and the data loader's share of its time.

Synthetic clouds (2048 points, 15 classes, generated in memory beforehand) go through a
``DataLoader`` (shuffled, as in training), the training batch transform (random permutation,
scale and translate), then the full-size Point-MAE forward pass (``eval()``, no autograd) whose
grouping (FPS + kNN) is timed on its own. Time spent waiting for the loader is the loader's
share: anything above a few percent means the model is being starved. Each worker setting runs
``--batches`` timed batches after an untimed first one (worker start-up); settings run
interleaved, and each keeps its fastest pass. The loader alone (no model) is timed too.

    python benchmarks/bench_pipeline.py [--batch 8] [--batches 10] [--workers 0 2]
                                        [--repeats 3] [--device cpu|cuda] [--quick]
"""
from __future__ import annotations

import argparse
import time

import pointclora  # noqa: F401  (first: OpenMP's wait policy is set before torch loads)

# isort: split
import torch
from common import (
    add_common_args,
    command_line,
    machine_description,
    markdown_table,
    report,
    scanobjectnn_model,
    setup,
    sync,
    synthetic_data,
)
from torch.utils.data import DataLoader

from pointclora.data import build_batch_transform, build_dataset
from pointclora.models import PointMAE

STAGES = ("loader", "transform", "grouping", "network")


class StageTimer:
    """Seconds per stage of the last pass; ``model.group`` is wrapped to time the grouping."""

    def __init__(self, model: torch.nn.Module, device: torch.device):
        self.device = device
        self.seconds = dict.fromkeys(STAGES, 0.0)
        group = model.group

        def timed_group(points):
            sync(device)
            start = time.perf_counter()
            out = group(points)
            sync(device)
            self.seconds["grouping"] += time.perf_counter() - start
            return out

        model.group = timed_group


def one_pass(loader, transform, model, timer: StageTimer | None, device) -> tuple[float, int]:
    """Wall time and clouds of all batches after the first; stage times go to ``timer``."""
    it = iter(loader)
    points, _ = next(it)  # worker start-up and first-call costs: not timed
    if model is not None:
        with torch.no_grad():
            model(transform(points.to(device)))
        timer.seconds = dict.fromkeys(STAGES, 0.0)
    sync(device)
    clouds = 0
    start = time.perf_counter()
    for points, _ in _timed(it, timer):
        clouds += len(points)
        if model is None:
            continue
        tick = time.perf_counter()
        points = transform(points.to(device, non_blocking=True))
        sync(device)
        timer.seconds["transform"] += time.perf_counter() - tick
        tick = time.perf_counter()
        with torch.no_grad():
            model(points)
        sync(device)
        timer.seconds["network"] += time.perf_counter() - tick
    total = time.perf_counter() - start
    if timer is not None:
        timer.seconds["network"] -= timer.seconds["grouping"]
    return total, clouds


def _timed(it, timer: StageTimer | None):
    while True:
        tick = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            return
        if timer is not None:
            timer.seconds["loader"] += time.perf_counter() - tick
        yield batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(parser, repeats=3)
    parser.add_argument("--batches", type=int, default=10, help="timed batches per pass (10)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2],
                        help="DataLoader num_workers settings to compare (0 2)")
    args = parser.parse_args()
    device = setup(args)
    batch = args.batch
    batches = 2 if args.quick else args.batches
    repeats = args.repeats
    npoints = 256 if args.quick else 2048

    data = synthetic_data((batches + 1) * batch, npoints)
    dataset = build_dataset(data, "train")
    transform = build_batch_transform(data, "train")
    torch.manual_seed(0)
    model = PointMAE(**scanobjectnn_model(args.quick)).to(device).eval()
    timer = StageTimer(model, device)
    loaders = {w: DataLoader(dataset, batch_size=batch, shuffle=True, drop_last=True,
                             num_workers=w, pin_memory=device.type == "cuda")
               for w in args.workers}
    best: dict[str, tuple[float, int, dict]] = {}
    for i in range(repeats):
        for w, loader in loaders.items():
            for name, with_model in ((f"{w} workers", True), (f"{w} workers, loader only", False)):
                total, clouds = one_pass(loader, transform, model if with_model else None,
                                         timer if with_model else None, device)
                if name not in best or total < best[name][0]:
                    best[name] = (total, clouds, dict(timer.seconds) if with_model else {})
        print(f"  round {i + 1}/{repeats}: " + ", ".join(
            f"{n} {b[1] / b[0]:.1f} clouds/s" for n, b in best.items()))
    report("pipeline", render(args, device, batch, batches, repeats, len(dataset), best), args)


def render(args, device, batch, batches, repeats, size, best) -> str:
    rows = []
    for name, (total, clouds, seconds) in best.items():
        if seconds:
            shares = [f"{100 * seconds[s] / total:.1f}" for s in STAGES]
        else:
            shares = ["100", "-", "-", "-"]
        rows.append([name, f"{clouds / total:.1f}", f"{1e3 * total / (clouds / batch):.0f}",
                     *shares])
    headers = ["pipeline", "clouds / s", "ms per batch", "% loader wait", "% transform",
               "% grouping", "% network"]
    model = "quick smoke sizes" if args.quick else \
        "full-size Point-MAE, 2048 points, 128 groups x 32, 15 classes"
    with_model = [(n, b) for n, b in best.items() if b[2]]
    worst = max(b[2]["loader"] / b[0] for _, b in with_model)
    verdict = ("the loader never starves the model" if worst < 0.05 else
               "the loader starves the model: more than 5% of the time is spent waiting for data")
    return "\n".join([
        "# Pipeline throughput: loader, transform, grouping, network",
        "",
        f"`{command_line()}`",
        "",
        f"- Setting: {size} synthetic clouds in memory, batch {batch}, {batches} timed batches "
        f"per pass after an untimed first one; {model}; `eval()`, `torch.no_grad()`; device "
        f"`{device}`.",
        f"- Machine: {machine_description(device)}.",
        f"- Fastest of {repeats} interleaved passes per setting. Shares are of the pass's wall "
        "time; the network share excludes the grouping.",
        "",
        markdown_table(headers, rows),
        "",
        f"- Largest loader share with the model: {100 * worst:.1f}% ({verdict}).",
    ])


if __name__ == "__main__":
    main()
