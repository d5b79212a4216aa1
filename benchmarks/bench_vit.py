"""Training step on a timm ViT: our LoRA against HF PEFT's, and every method against full FT.

Setting: the stock timm ViT-B/16 (``vit_base_patch16_224``, random weights: the cost does not
depend on their values), 224-pixel images, 10 classes. One step: forward, cross-entropy plus
the adapter regulariser, backward, an AdamW step over the trainable parameters. LoRA in both
libraries: rank 8, alpha 16, no dropout, on the fused ``attn.qkv`` (our ``split_qkv`` off, so
one (A, B) pair per layer as PEFT builds it), the head trainable (PEFT's ``modules_to_save``),
tokens frozen: the same trainable parameters, checked. The other methods use their defaults
except the tokens, frozen in every adapter row as in PEFT's (training them costs every method
the same backward through the first block), so the rows differ by the method only.
"frozen floor" trains only the qkv biases and the head: the same backward through every block
as LoRA on qkv, with no low-rank work, so no LoRA implementation can take less time.
"peft lora, 2nd copy" is a second, identical PEFT model: its ratio to the first shows how far
two identical contenders differ in the run (the precision of the table's ratios).
Contenders run interleaved (``common.interleaved_times``): the table gives each one's minimum
and, as ratios, the median over rounds of the time ratio within a round; peak memory is
measured in a fresh process per contender. Each method's merged model must compute what the
adapted one does, and load strictly into a fresh timm model.

    python benchmarks/bench_vit.py [--batch 4] [--repeats 5] [--device cpu|cuda] [--quick]
                                   [--no-memory] [--no-peft] [--busy N]

A second table times one adapted layer alone (block 0's qkv, forward + backward at the step's
token count): the frozen ``nn.Linear``, our LoRA layer and PEFT's.

``--busy N``: time the steps while N other processes each keep one core busy (a busy
neighbour); written to ``vit_busy.md``. ``--quick``: a 2-block ViT at 32 pixels, one
repetition (a smoke run; nothing is written).
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
    interleaved_times,
    machine_description,
    markdown_table,
    measure_contenders,
    paired_ratio,
    ratio_text,
    report,
    setup,
    sync,
    with_busy,
)

from pointclora.adapters import apply_adapter, merge_adapter, parameter_report, regularization_loss
from pointclora.models.vit import build_vit

FLOOR = "frozen floor"
CONTROL = "peft lora, 2nd copy"  # the same model again: how far identical contenders differ
PEFT_MODELS = ("peft lora", CONTROL)
METHODS = ("full", "lora", "peft lora", FLOOR, "clora", "serial_lora", "aoft", CONTROL)
LORA = dict(r=8, alpha=16.0, target_modules=["attn.qkv"], split_qkv=False, train_tokens=False)
CLASSES = 10


def vit_options(quick: bool) -> dict:
    if quick:
        return dict(arch="vit_tiny_patch16_224", img_size=32, depth=2, drop_path_rate=0.0)
    return dict(arch="vit_base_patch16_224", drop_path_rate=0.0)


def build(contender: str, state: dict, quick: bool, device: torch.device) -> torch.nn.Module:
    """The contender's model on ``device``, every one from the same initial weights."""
    model = build_vit(cls_dim=CLASSES, **vit_options(quick))
    model.load_state_dict(state)
    if contender in PEFT_MODELS:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0,
                            target_modules=["qkv"], bias="none", modules_to_save=["head"])
        model = get_peft_model(model, config)
    elif contender == "lora":
        apply_adapter(model, "lora", **LORA)
    elif contender == FLOOR:
        for name, param in model.named_parameters():
            param.requires_grad_(name.startswith("head.") or name.endswith("attn.qkv.bias"))
    elif contender == "full":
        apply_adapter(model, "full")
    else:
        apply_adapter(model, contender, train_tokens=False)
    return model.to(device)


def make_step(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-4)
    core = getattr(model, "base_model", model)  # PEFT wraps the timm model

    def step() -> None:
        loss = F.cross_entropy(model(images), labels) + regularization_loss(core)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step.optimizer = optimizer
    return step


def batch(n: int, quick: bool, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    size = 32 if quick else 224
    images = torch.randn(n, 3, size, size, generator=gen)
    return images.to(device), torch.randint(0, CLASSES, (n,), generator=gen).to(device)


def merge_check(name: str, model: torch.nn.Module, state: dict, quick: bool,
                images: torch.Tensor) -> float:
    """max |merged - adapted| on ``images``, after a strict load into a fresh timm model."""
    model.eval()
    with torch.no_grad():
        adapted = model(images)
        merged = merge_adapter(model) if name != "full" else model
        fresh = build_vit(cls_dim=CLASSES, **vit_options(quick)).to(images.device).eval()
        fresh.load_state_dict(merged.state_dict(), strict=True)
        return (fresh(images) - adapted).abs().max().item()


def qkv_layer(model: torch.nn.Module) -> torch.nn.Module:
    """Block 0's qkv projection of a contender (PEFT nests the timm model two levels down)."""
    core = model.base_model.model if hasattr(model, "base_model") else model
    return core.blocks[0].attn.qkv


def layer_table(models: dict[str, torch.nn.Module], batch: int, repeats: int,
                device: torch.device) -> str:
    """Forward + backward of block 0's qkv alone at the step's token count, gradient to the
    input as inside the model."""
    vit = models["lora"]
    tokens = batch * (vit.patch_embed.num_patches + vit.num_prefix_tokens)
    ours = qkv_layer(models["lora"])
    layers = {"frozen nn.Linear": ours.base_layer, "lora": ours,
              "peft lora": qkv_layer(models["peft lora"])}
    x = torch.randn(tokens, layers["lora"].in_features, device=device, requires_grad=True)
    g = torch.randn(tokens, layers["lora"].out_features, device=device)
    samples = interleaved_times({n: (lambda m=m: m(x).backward(g)) for n, m in layers.items()},
                                repeats, device, log=None)
    rows = [[name, f"{min(samples[name]) * 1e3:.2f}", ratio_text(samples, name, "peft lora")]
            for name in layers]
    return "\n".join([
        f"## One qkv layer ({layers['lora'].in_features} -> {layers['lora'].out_features}), "
        f"forward + backward at {tokens:,} tokens", "",
        f"{repeats} interleaved rounds; ms is the minimum, the ratio the median per-round ratio "
        "(95% bootstrap interval).",
        "", markdown_table(["layer", "ms", "time / PEFT LoRA"], rows)])


def child(argv: list[str]) -> None:
    """Peak memory of two training steps of one contender, as one JSON line."""
    contender, n, device, quick = contender_args(argv)
    images, labels = batch(n, quick, device)
    torch.manual_seed(0)
    state = build_vit(cls_dim=CLASSES, **vit_options(quick)).state_dict()
    with PeakMemory(device) as mem:
        model = build(contender, state, quick, device)
        mem.restart_peak()  # the weights stay counted, the copy made while building does not
        step = make_step(model, images, labels)
        step()
        step()
    print(json.dumps({"peak": mem.peak}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(parser, repeats=9)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    parser.add_argument("--no-peft", action="store_true", help="leave HF PEFT out")
    parser.add_argument("--busy", type=int, default=0,
                        help="processes keeping one core busy each while timing (default 0)")
    args = parser.parse_args()
    explicit = args.batch
    device = setup(args)
    if explicit is None and device.type == "cpu" and not args.quick:
        args.batch = 4  # the CPU setting of the README table: ViT-B/16, batch 4, 224 px
    names = [m for m in METHODS if not (args.no_peft and m in PEFT_MODELS)]
    torch.manual_seed(0)
    state = build_vit(cls_dim=CLASSES, **vit_options(args.quick)).state_dict()
    images, labels = batch(args.batch, args.quick, device)
    models = {name: build(name, state, args.quick, device) for name in names}
    trainable = {name: parameter_report(m)["trainable"] for name, m in models.items()}
    if "peft lora" in trainable and trainable["peft lora"] != trainable["lora"]:
        raise SystemExit(f"trainable parameters differ: ours {trainable['lora']:,}, "
                         f"PEFT {trainable['peft lora']:,}")
    steps = {name: make_step(m, images, labels) for name, m in models.items()}
    print(machine_description(device))
    samples = with_busy(args.busy, lambda: interleaved_times(steps, args.repeats, device))
    layers = ""
    if "peft lora" in models:  # before merge_check, which merges the models in place
        layers = with_busy(args.busy, lambda: layer_table(
            models, args.batch, 1 if args.quick else 20, device))
    sync(device)
    diffs = {name: merge_check(name, models[name], state, args.quick, images[:2])
             for name in names if name not in (*PEFT_MODELS, FLOOR)}
    memory = {} if args.no_memory else {
        name: result["peak"] for name, result in measure_contenders(
            Path(__file__), [n for n in names if n != CONTROL], args, device).items()}
    rows = []
    for name in names:
        row = [name, f"{trainable[name]:,}", f"{min(samples[name]) * 1e3:.0f}",
               f"{paired_ratio(samples, name, 'full'):.2f}"]
        if "peft lora" in samples:
            row.append(ratio_text(samples, name, "peft lora"))
        if memory:
            row += ([f"{memory[name] / 2**20:.0f}", f"{memory[name] / memory['full']:.2f}"]
                    if name in memory else ["", ""])
        row.append(f"{diffs[name]:.1e}" if name in diffs else "")
        rows.append(row)
    headers = ["method", "trainable params", "step ms", "time / full"]
    headers += ["time / PEFT LoRA"] if "peft lora" in samples else []
    headers += ["peak MiB", "memory / full"] if memory else []
    headers.append("merged vs adapted, max abs diff")
    size = "2-block ViT-Ti at 32 px" if args.quick else "ViT-B/16 at 224 px"
    busy = f", {args.busy} busy neighbour process(es)" if args.busy else ""
    text = "\n".join([
        f"# Training step on a timm {size}, batch {args.batch}, {device}{busy}", "",
        f"`{command_line()}`", "", machine_description(device), "",
        f"{args.repeats} interleaved rounds: step ms is the minimum, a ratio the median over "
        "rounds of the two contenders' times in the same round (in brackets: 95% bootstrap "
        "interval of that median). LoRA and PEFT LoRA: r=8, alpha 16 "
        "on the fused attn.qkv, head trainable; the other methods at their defaults, tokens "
        f"frozen in every adapter row. {FLOOR}: only the qkv biases and the head "
        "train, the same backward with no low-rank work (a lower bound for any LoRA). "
        + (f"{CONTROL}: the PEFT model again, a control for the precision of the ratios. "
           if CONTROL in names else "")
        + "Peak memory: fresh process per contender, two steps, weights counted.", "",
        markdown_table(headers, rows)])
    if layers:
        text += "\n\n" + layers
    report("vit_busy" if args.busy else "vit", text, args)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == CHILD_FLAG:
        child(sys.argv[2:])
    else:
        main()
