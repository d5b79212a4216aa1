"""Part-segmentation training step: our model against the official code, and every method.

One step is what the trainer does per batch: forward (grouping included), per-point NLL plus
the adapter regulariser, backward, gradient clipping at 10 and an AdamW step with the official
weight-decay groups. Setting: ShapeNetPart (2048 points, 128 groups of 32, 16 categories,
50 parts), the full-size model (27.1 M parameters), one fixed batch of synthetic part shapes
through the official augmentation. Every contender starts from the same weights; they run
interleaved in one process and keep the minimum over the repetitions; peak memory is
measured in a fresh process per contender.

    python benchmarks/bench_partseg.py [--batch 8] [--repeats 5] [--device cpu|cuda] [--quick]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pointclora  # noqa: F401  (first: OpenMP's wait policy is set before torch loads)

# isort: split
import torch
import torch.nn.functional as F
from bench_train_step import TRAIN, persistent_bytes
from common import (
    CHILD_FLAG,
    PeakMemory,
    add_common_args,
    command_line,
    contender_args,
    interleaved_min,
    machine_description,
    markdown_table,
    measure_contenders,
    report,
    setup,
)
from reference_partseg import ReferencePartSeg

from pointclora.adapters import apply_adapter, parameter_report, regularization_loss
from pointclora.data.shapenetpart import PartAugment
from pointclora.data.synthetic_parts import generate_parts
from pointclora.engine.optim import build_optimizer
from pointclora.models import PointMAEPartSeg

METHODS = ("full", "linear", "lora", "clora", "serial_lora", "aoft")
REFERENCE = "reference"  # the official code, full fine-tuning


def model_config(quick: bool) -> dict:
    return dict(num_group=32, group_size=16, depth=3) if quick else dict(num_group=128)


def part_batch(batch: int, npoints: int, device: torch.device, seed: int = 0):
    """``batch`` synthetic part shapes (cycling over the categories), augmented."""
    per_category = -(-batch // 16)
    points, category, parts = generate_parts(per_category, npoints, seed, "train")
    pick = torch.arange(batch) % 16 * per_category + torch.arange(batch) // 16
    points = PartAugment()(points[pick], generator=torch.Generator().manual_seed(seed))
    return points.to(device), category[pick].to(device), parts[pick].to(device)


def build(contender: str, state: dict, cfg: dict, device: torch.device) -> torch.nn.Module:
    model = ReferencePartSeg(**cfg) if contender == REFERENCE else PointMAEPartSeg(**cfg)
    model.load_state_dict(state)
    if contender != REFERENCE:
        apply_adapter(model, contender)
    return model.to(device).train()


def make_step(model: torch.nn.Module, points, category, parts):
    optimizer = build_optimizer(model, TRAIN)
    params = [p for p in model.parameters() if p.requires_grad]
    inputs = model_inputs(model, points, category)

    def step() -> None:
        out = model(*inputs)
        loss = F.nll_loss(out.reshape(-1, out.shape[-1]), parts.reshape(-1))
        loss = loss + regularization_loss(model)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 10.0)
        optimizer.step()
    step.optimizer = optimizer
    return step


def child(argv: list[str]) -> None:
    """Peak memory of two training steps of one contender, as one JSON line."""
    contender, batch, device, quick = contender_args(argv)
    cfg = model_config(quick)
    data = part_batch(batch, 256 if quick else 2048, device)
    with PeakMemory(device) as mem:
        torch.manual_seed(0)
        model = build(contender, PointMAEPartSeg(**cfg).state_dict(), cfg, device)
        mem.restart_peak()
        step = make_step(model, *data)
        step()
        step()
    print(json.dumps({"peak": mem.peak, "persistent": persistent_bytes(model,
                                                                       step.optimizer.state)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(parser, repeats=5)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    args = parser.parse_args()
    device = setup(args)
    cfg = model_config(args.quick)
    torch.manual_seed(0)
    state = PointMAEPartSeg(**cfg).state_dict()
    data = part_batch(args.batch, 256 if args.quick else 2048, device)
    names = [REFERENCE, *METHODS]
    models = {name: build(name, state, cfg, device) for name in names}
    with torch.no_grad():  # the baseline is the same function (also tests/test_partseg.py)
        ours, ref = models["full"].eval(), models[REFERENCE].eval()
        inputs = model_inputs(ours, *data[:2]), model_inputs(ref, *data[:2])
        diff = (ours(*inputs[0]) - ref(*inputs[1])).abs().max().item()
        ours.train(), ref.train()
    steps = {name: make_step(m, *data) for name, m in models.items()}
    trainable = {name: parameter_report(m)["trainable"] for name, m in models.items()}
    print(f"batch {args.batch}, {args.repeats} interleaved rounds; max |ours - official| "
          f"log-prob difference in eval: {diff:.2e}")
    times = interleaved_min(steps, args.repeats, device)
    del steps, models
    memory = {} if args.no_memory else measure_contenders(Path(__file__), names, args, device)
    report("partseg_step", render(args, device, names, times, memory, trainable, diff), args)


def model_inputs(model, points, category) -> tuple:
    """What ``model`` takes; the official code: (B, 3, N) points and a (B, 1, 16) one-hot."""
    if isinstance(model, ReferencePartSeg):
        return points.transpose(1, 2), F.one_hot(category, 16).float().unsqueeze(1)
    return points, category


def render(args, device, names, times, memory, trainable, diff) -> str:
    full_t = times["full"]
    rows = []
    for name in names:
        row = ["official code, full" if name == REFERENCE else name, f"{trainable[name]:,}",
               f"{times[name] * 1e3:.0f}", f"{times[name] / full_t:.2f}"]
        if memory:
            peak, full_peak = memory[name]["peak"], memory["full"]["peak"]
            row += [f"{peak / 2**20:.0f}", f"{peak / full_peak:.2f}"]
        rows.append(row)
    headers = ["method", "trainable", "step ms (min)", "time / full"]
    if memory:
        headers += ["peak MiB", "memory / full"]
    size = "quick smoke sizes" if args.quick else \
        "2048 points, 128 groups x 32, 16 categories, 50 parts, 27.1 M parameters"
    ratio = full_t / times[REFERENCE]
    return "\n".join([
        "# Part segmentation: training step of each method and of the official code", "",
        f"`{command_line()}`", "",
        f"- Setting: batch {args.batch}, {size}; device `{device}`.",
        f"- Machine: {machine_description(device)}.",
        f"- Step: forward (grouping included) + NLL + regulariser, backward, clip 10, AdamW. "
        f"Minimum of {args.repeats} interleaved repetitions after one warm-up round; same "
        f"initial weights and batch. Outputs of ours and the official code differ by at most "
        f"{diff:.1e} (log-probabilities, eval mode).",
        "", markdown_table(headers, rows), "",
        f"- Our full fine-tuning step vs the official code: {ratio:.2f}x the time "
        f"({(1 - ratio) * 100:.0f}% faster; target at least 20%: "
        f"{'met' if ratio <= 0.8 else 'NOT met'}).",
    ])


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == CHILD_FLAG:
        child(sys.argv[2:])
    else:
        main()
