"""Training-step cost of each fine-tuning method, and of our model code against the official one.

One step is what the trainer does per batch: forward (grouping included), cross-entropy plus
the adapter regulariser, backward, gradient clipping at 10 and an AdamW step with the official
weight-decay groups. Setting: ScanObjectNN (2048 points, 128 groups of 32, 15 classes), the
full-size Point-MAE, one fixed batch of synthetic clouds through the training transform. Every
contender starts from the same weights. Contenders run interleaved in one process and keep the
minimum over the repetitions; peak memory is measured in a fresh process per contender
(``common.PeakMemory``).

    python benchmarks/bench_train_step.py [--batch 8] [--repeats 5] [--device cpu|cuda]
                                          [--ablation] [--quick]

``--ablation`` adds, for every low-rank method, two other training paths next to the one the
adapters use (``LowRankLinearFunction``: forward ``W x + up (down x)``, a hand-written backward
through the low-rank factors): "dense", plain autograd on ``(W + Delta W) x``, whose backward
forms a ``d_out x d_in`` weight gradient, and "factored", plain autograd on
``W x + up (down x)``.
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
    scanobjectnn_model,
    setup,
    sync,
    synthetic_batch,
)
from reference_pointmae import ReferencePointMAE

from pointclora.adapters import apply_adapter, parameter_report, regularization_loss
from pointclora.adapters.base import LowRankLinear
from pointclora.engine.optim import build_optimizer
from pointclora.models import PointMAE

PEFT = ("lora", "clora", "serial_lora", "aoft")
BASELINES = ("adapter", "vpt_deep", "idpt", "dapt", "pointgst")  # the comparison methods
METHODS = ("full", "linear", *PEFT, *BASELINES)
REFERENCE = "reference"  # the official code, full fine-tuning
PATHS = (" (dense)", " (factored)")  # suffixes of the ablation contenders
TRAIN = {"lr": 5e-4, "weight_decay": 0.05}


def build(contender: str, state: dict, cfg: dict, device: torch.device) -> torch.nn.Module:
    """The model of a contender, loaded with ``state`` (the shared initial weights)."""
    if contender == REFERENCE:
        model = ReferencePointMAE(**cfg)
        model.load_state_dict(state)
        return model.to(device).train()
    method, _, path = contender.partition(" ")
    model = PointMAE(**cfg)
    model.load_state_dict(state)
    apply_adapter(model, method)
    for module in model.modules():
        if isinstance(module, LowRankLinear) and path:
            module.forward = (module.dense_forward if path == PATHS[0].strip()
                              else factored_forward(module))
    return model.to(device).train()


def factored_forward(module: LowRankLinear):
    """``W x + b + up (down x)`` through plain autograd ops (block-diagonal ``up`` for slices)."""
    def forward(x: torch.Tensor) -> torch.Tensor:
        up, down = module.factors()
        hidden = F.linear(x, down.reshape(-1, module.in_features))
        up = up[0] if len(up) == 1 else torch.block_diag(*up)
        return module.base_layer(x) + F.linear(hidden, up)
    return forward


def make_step(model: torch.nn.Module, points: torch.Tensor, labels: torch.Tensor):
    optimizer = build_optimizer(model, TRAIN)
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> None:
        loss = F.cross_entropy(model(points), labels) + regularization_loss(model)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 10.0)
        optimizer.step()
    step.optimizer = optimizer
    return step


def persistent_bytes(model: torch.nn.Module, optimizer_state: dict) -> int:
    """Parameters, gradients and optimizer state: what stays allocated between steps."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    total += sum(p.grad.numel() * p.grad.element_size() for p in model.parameters()
                 if p.grad is not None)
    for state in optimizer_state.values():
        total += sum(t.numel() * t.element_size() for t in state.values()
                     if isinstance(t, torch.Tensor))
    return total


def child(argv: list[str]) -> None:
    """Peak memory of two training steps of one contender, as one JSON line."""
    contender, batch, device, quick = contender_args(argv)
    cfg = scanobjectnn_model(quick)
    points, labels = synthetic_batch(batch, 256 if quick else 2048, device)
    with PeakMemory(device) as mem:
        torch.manual_seed(0)  # the initial weights of main()
        model = build(contender, PointMAE(**cfg).state_dict(), cfg, device)
        mem.restart_peak()  # the weights stay counted, the copy made while building does not
        step = make_step(model, points, labels)
        step()
        step()
    kept = persistent_bytes(model, step.optimizer.state)
    print(json.dumps({"peak": mem.peak, "persistent": kept}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(parser, repeats=5)
    parser.add_argument("--ablation", action="store_true",
                        help="time the adapters' three training paths side by side")
    parser.add_argument("--profile", nargs="*", metavar="METHOD",
                        help="instead of timing, profile one step of each METHOD (default: "
                             "full clora) and list the top ops by self CPU time")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    args = parser.parse_args()
    device = setup(args)
    batch = args.batch
    repeats = args.repeats
    cfg = scanobjectnn_model(args.quick)

    torch.manual_seed(0)
    state = PointMAE(**cfg).state_dict()
    points, labels = synthetic_batch(batch, 256 if args.quick else 2048, device)
    if args.profile is not None:
        profile(args, device, batch, state, cfg, points, labels)
        return
    if args.ablation:  # the training paths of the adapters, side by side
        names = ["full"] + [m + p for m in PEFT for p in ("", *PATHS)]
    else:
        names = [REFERENCE, *METHODS]
    models = {name: build(name, state, cfg, device) for name in names}
    steps = {name: make_step(m, points, labels) for name, m in models.items()}
    trainable = {name: parameter_report(m)["trainable"] for name, m in models.items()}
    print(f"batch {batch}, {repeats} interleaved rounds")
    times = interleaved_min(steps, repeats, device)
    del steps, models

    memory = {} if args.no_memory else measure_contenders(Path(__file__), names, args, device)

    text = render(args, device, batch, repeats, names, times, memory, trainable)
    if args.ablation:
        text += "\n\n" + layer_ablation(state, cfg, device, batch, 1 if args.quick else 20)
    report("train_step_ablation" if args.ablation else "train_step", text, args)


def layer_ablation(state: dict, cfg: dict, device: torch.device, batch: int,
                   repeats: int) -> str:
    """Forward + backward of one adapted layer (block 0's qkv and proj) per training path.

    A whole step hides a few milliseconds per layer in its noise; one layer at the step's
    token count shows them. "frozen" is the wrapped ``nn.Linear`` alone (gradient to the input
    only): the floor every path pays.
    """
    tokens = batch * (cfg["num_group"] + 1)
    contenders, labels = {}, []
    for method in PEFT:
        models = {p: build(method + p, state, cfg, device) for p in ("", *PATHS)}
        for layer in ("qkv", "proj"):
            wrappers = {p: getattr(m.blocks.blocks[0].attn, layer) for p, m in models.items()}
            if not isinstance(wrappers[""], LowRankLinear):  # not a target of this method
                continue
            base = wrappers[""].base_layer
            x = torch.randn(tokens, base.in_features, device=device, requires_grad=True)
            g = torch.randn(tokens, base.out_features, device=device)
            for path, module in [(" frozen", base), *wrappers.items()]:
                name = f"{method} {layer}{path or ' (ours)'}"
                contenders[name] = (lambda m=module, x=x, g=g: m(x).backward(g))
            labels.append((method, layer))
    times = interleaved_min(contenders, repeats, device, log=None)
    cols = [" frozen", " (ours)", *PATHS]
    rows = [[method, layer, *(f"{times[f'{method} {layer}{c}'] * 1e3:.2f}" for c in cols)]
            for method, layer in labels]
    return "\n".join([
        f"## One adapted layer: forward + backward at {tokens:,} tokens (ms, min of {repeats})",
        "",
        "\"frozen\": the frozen `nn.Linear` alone (gradient to its input only), the floor of "
        "every path; \"ours\": `LowRankLinearFunction`.",
        "",
        markdown_table(["method", "layer", "frozen", "ours", "dense", "factored"], rows,
                       align="llrrrr"),
    ])


def profile(args, device, batch, state, cfg, points, labels, top: int = 10) -> None:
    """Top ops by self CPU time of one step (after two warm-up steps) per method."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda"
                                           else [])
    lines = ["# Training step profile", "", f"`{command_line()}`", "",
             f"- Batch {batch}, the setting of `train_step.md`; device `{device}`.",
             f"- Machine: {machine_description(device)}.",
             "- One step under `torch.profiler` after two warm-up steps; top "
             f"{top} ops by self CPU time (the profiler adds its own overhead).", ""]
    for name in args.profile or ["full", "clora"]:
        step = make_step(build(name, state, cfg, device), points, labels)
        step(), step()
        sync(device)
        with torch_profile(activities=activities) as prof:
            step()
            sync(device)
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        rows = [[f"`{e.key}`", f"{e.self_cpu_time_total / 1e3:.1f}",
                 f"{100 * e.self_cpu_time_total / total:.1f}", e.count]
                for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]]
        lines += [f"## {name}: {total / 1e3:.0f} ms self CPU in all", "",
                  markdown_table(["op", "self CPU ms", "%", "calls"], rows), ""]
    report("train_step_profile", "\n".join(lines), args)


def render(args, device, batch, repeats, names, times, memory, trainable) -> str:
    full_t = times["full"]
    peak = {name: m["peak"] for name, m in memory.items()}
    rows = []
    for name in names:
        label = "official code, full" if name == REFERENCE else name
        row = [label, f"{trainable[name]:,}", f"{times[name] * 1e3:.0f}",
               f"{times[name] / full_t:.2f}"]
        if memory:
            kept = memory[name]["persistent"]
            row += [f"{peak[name] / 2**20:.0f}", f"{peak[name] / peak['full']:.2f}",
                    f"{kept / 2**20:.0f}", f"{(peak[name] - kept) / 2**20:.0f}"]
        rows.append(row)
    headers = ["method", "trainable", "step ms (min)", "time / full"]
    if memory:
        headers += ["peak MiB", "memory / full", "of which weights+grads+AdamW MiB",
                    "rest (activations) MiB"]
    size = "quick smoke sizes" if args.quick else \
        "2048 points, 128 groups x 32, 15 classes, full-size Point-MAE (22.1 M parameters)"
    lines = [
        "# Training step: fine-tuning methods and the official code",
        "",
        f"`{command_line()}`",
        "",
        f"- Setting: batch {batch}, {size}; device `{device}`.",
        f"- Machine: {machine_description(device)}.",
        f"- Step: forward (grouping included) + cross-entropy + regulariser, backward, "
        f"clip 10, AdamW. Minimum of {repeats} interleaved repetitions after one warm-up "
        f"round; all contenders in one process, same initial weights and batch.",
    ]
    if memory:
        lines.append("- Peak memory: " + (
            "`torch.cuda.max_memory_allocated` over two steps"
            if device.type == "cuda" else
            "peak RSS over two steps minus the RSS before the model was built, in a fresh "
            "process per contender with glibc's mmap threshold at 64 KiB (freed tensors leave "
            "the resident set)") + "; it covers the weights, gradients, AdamW state and "
            "activations, not the copy made while loading the weights.")
    lines += [
        "",
        markdown_table(headers, rows),
    ]
    peft = [n for n in PEFT if n in times]
    if peft:
        worst_t = max(times[n] / full_t for n in peft)
        lines += ["", f"- Every PEFT method at most 0.6x the full step time: worst "
                  f"{worst_t:.2f}x ({'met' if worst_t <= 0.6 else 'NOT met'})."]
        if peak:
            worst_m = max(peak[n] / peak["full"] for n in peft)
            lines.append(f"- Peak memory at most 0.5x full: worst {worst_m:.2f}x "
                         f"({'met' if worst_m <= 0.5 else 'NOT met'}).")
    if REFERENCE not in times:
        return "\n".join(lines)
    ratio = full_t / times[REFERENCE]
    lines.append(f"- Our full fine-tuning step vs the official code: {ratio:.2f}x the time "
                 f"({(1 - ratio) * 100:.0f}% faster; target at least 10%: "
                 f"{'met' if ratio <= 0.9 else 'NOT met'}).")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == CHILD_FLAG:
        child(sys.argv[2:])
    else:
        main()
