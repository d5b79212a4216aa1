"""Inference cost of adapted models: merged and unmerged adapters against the plain backbone.

Evaluation forward passes (``eval()``, no autograd, grouping included) of the full-size
Point-MAE at the ScanObjectNN setting (2048 points, 128 groups of 32, 15 classes) on one batch
of synthetic clouds. Each adapter is first moved away from its (identity) initialisation, as
after training; "merged" is ``merge_adapter`` of that model (a plain backbone again),
"unmerged" evaluates the wrappers, which form ``W + Delta W`` once per call. Outputs of each
merged / unmerged pair are checked to agree before timing. Contenders run interleaved and keep
the minimum over the repetitions; a second copy of the plain backbone shows the noise level.

    python benchmarks/bench_inference.py [--batch 8] [--repeats 10] [--device cpu|cuda] [--quick]
"""
from __future__ import annotations

import argparse
import copy

import pointclora  # noqa: F401  (first: OpenMP's wait policy is set before torch loads)

# isort: split
import torch
from common import (
    add_common_args,
    command_line,
    interleaved_min,
    machine_description,
    markdown_table,
    report,
    scanobjectnn_model,
    setup,
    synthetic_batch,
)
from reference_pointmae import ReferencePointMAE

from pointclora.adapters import apply_adapter, merge_adapter
from pointclora.models import PointMAE

PEFT = ("lora", "clora", "serial_lora", "aoft")
PLAIN = "plain backbone"
CONTROL = "plain backbone, 2nd copy"  # its ratio to PLAIN is the timing noise of this run
REFERENCE = "official code"


def trained_adapter(state: dict, cfg: dict, method: str, seed: int) -> torch.nn.Module:
    """The backbone with ``method`` whose trainable tensors moved away from their init."""
    model = PointMAE(**cfg)
    model.load_state_dict(state)
    apply_adapter(model, method)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.02 * torch.randn(param.shape, generator=gen))
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(parser, repeats=10)
    args = parser.parse_args()
    device = setup(args)
    batch = args.batch
    repeats = args.repeats
    cfg = scanobjectnn_model(args.quick)

    torch.manual_seed(0)
    plain = PointMAE(**cfg)
    state = plain.state_dict()
    reference = ReferencePointMAE(**cfg)
    reference.load_state_dict(state)
    models = {PLAIN: plain, CONTROL: copy.deepcopy(plain), REFERENCE: reference}
    for i, method in enumerate(PEFT):
        adapted = trained_adapter(state, cfg, method, seed=i)
        models[f"{method} merged"] = merge_adapter(copy.deepcopy(adapted))
        models[f"{method} unmerged"] = adapted
    points, _ = synthetic_batch(batch, 256 if args.quick else 2048, device, mode="test")
    for model in models.values():
        model.to(device).eval()

    def forward(model):
        def run():
            with torch.no_grad():
                return model(points)
        return run

    contenders = {name: forward(model) for name, model in models.items()}
    for method in PEFT:  # the merge must not change the function, or the timing means nothing
        merged, unmerged = contenders[f"{method} merged"](), contenders[f"{method} unmerged"]()
        torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-4)
    print(f"batch {batch}, {repeats} interleaved rounds")
    times = interleaved_min(contenders, repeats, device)
    report("inference", render(args, device, batch, repeats, times), args)


def render(args, device, batch, repeats, times) -> str:
    base = times[PLAIN]
    rows = [[name, f"{t * 1e3:.1f}", f"{batch / t:.1f}", f"{t / base:.2f}"]
            for name, t in times.items()]
    merged = [times[f"{m} merged"] / base for m in PEFT]
    unmerged = [times[f"{m} unmerged"] / base for m in PEFT]
    size = "quick smoke sizes" if args.quick else \
        "2048 points, 128 groups x 32, 15 classes, full-size Point-MAE"
    return "\n".join([
        "# Inference: merged and unmerged adapters against the plain backbone",
        "",
        f"`{command_line()}`",
        "",
        f"- Setting: batch {batch}, {size}; `eval()` and `torch.no_grad()`, grouping included; "
        f"device `{device}`.",
        f"- Machine: {machine_description(device)}.",
        f"- Minimum of {repeats} interleaved repetitions after one warm-up round, all "
        "contenders in one process on the same batch; adapters moved away from their init "
        "(merged and unmerged outputs checked equal first).",
        "",
        markdown_table(["model", "ms per batch (min)", "clouds / s", "time / plain"], rows),
        "",
        f"- Timing noise of this run: the plain backbone against a copy of itself "
        f"{times[CONTROL] / base:.2f}x.",
        f"- Merged adapters vs the plain backbone: {min(merged):.2f}x to {max(merged):.2f}x "
        "(the same modules and weight shapes: 1.00x up to timing noise).",
        f"- Unmerged adapters: {min(unmerged):.2f}x to {max(unmerged):.2f}x (target at most "
        f"1.10x: {'met' if max(unmerged) <= 1.10 else 'NOT met'}).",
    ])


if __name__ == "__main__":
    main()
