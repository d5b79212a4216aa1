"""Fine-tune Point-MAE with CLoRA in plain PyTorch: the README's Python snippet, runnable.

    python examples/finetune_clora.py                        # small model, about a minute on CPU
    python examples/finetune_clora.py --pretrained pretrain.pth --full-size --steps 2000

By default a small, randomly initialised Point-MAE learns the built-in synthetic shapes (no
download). With --pretrained (the official Point-MAE `pretrain.pth`; use --full-size for
its architecture) the frozen backbone is the pre-trained one. The script then saves only
the adapter, checks that merging it into the backbone changes no prediction, and that the
saved adapter restores the same model.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import pointclora  # noqa: F401  (first: sets OpenMP's wait policy before torch loads)

# isort: split
import torch

from pointclora.adapters import (
    adapter_state_dict,
    apply_adapter,
    load_adapter,
    merge_adapter,
    parameter_report,
    regularization_loss,
)
from pointclora.data import build_batch_transform, build_dataset
from pointclora.models import PointMAE

SMALL = dict(num_group=16, group_size=8, trans_dim=96, depth=2, num_heads=4, encoder_dims=96)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pretrained", help="official Point-MAE pretrain.pth (optional)")
    parser.add_argument("--full-size", action="store_true",
                        help="the official architecture (needed for --pretrained)")
    parser.add_argument("--steps", type=int, default=150, help="optimiser steps (150)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--samples-per-class", type=int, default=40,
                        help="synthetic clouds per class and split (40)")
    parser.add_argument("--out", type=Path, help="where clora.pth is saved (default: a "
                        "temporary folder)")
    return parser.parse_args(argv)


def backbone(args) -> PointMAE:
    """The frozen backbone: pre-trained, or random from a fixed seed (so it can be rebuilt)."""
    torch.manual_seed(0)
    model = PointMAE(cls_dim=8, **({} if args.full_size else SMALL))
    if args.pretrained:
        print(model.load_pretrained(args.pretrained))  # loaded / expected-missing report
    return model


@torch.no_grad()
def predictions(model, points: torch.Tensor) -> torch.Tensor:
    return model.eval()(points).argmax(-1)


def main(argv=None) -> float:
    args = parse_args(argv)
    data = {"name": "synthetic", "num_classes": 8, "samples_per_class": args.samples_per_class,
            "npoints": 256}
    train_set, test_set = build_dataset(data, "train"), build_dataset(data, "test")
    train_tf, test_tf = build_batch_transform(data, "train"), build_batch_transform(data, "test")
    test_points = test_tf(torch.stack([test_set[i][0] for i in range(len(test_set))]))
    test_labels = torch.tensor([test_set[i][1] for i in range(len(test_set))])

    # --- the README snippet -----------------------------------------------------------
    model = backbone(args)
    apply_adapter(model, "clora", r=8, p=4, sade_weight=1e-3)
    print(parameter_report(model))                      # trainable with and without the head
    criterion = torch.nn.CrossEntropyLoss()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3,
                                  weight_decay=0.05)
    loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size, shuffle=True,
                                         drop_last=True)
    step = 0
    while step < args.steps:
        for points, labels in loader:
            model.train()
            points = train_tf(points)
            loss = criterion(model(points), labels) + regularization_loss(model)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            if step % 50 == 0 or step == args.steps:
                print(f"step {step}: loss {loss.item():.3f}")
            if step == args.steps:
                break
    out = args.out or Path(tempfile.mkdtemp(prefix="clora_example_"))
    out.mkdir(parents=True, exist_ok=True)
    torch.save(adapter_state_dict(model), out / "clora.pth")  # only what was trained
    before = predictions(model, test_points)
    merge_adapter(model)                                     # plain backbone, official keys
    # ------------------------------------------------------------------------------------

    merged = predictions(model, test_points)
    accuracy = 100.0 * (merged == test_labels).float().mean().item()
    print(f"test accuracy {accuracy:.1f}% on {len(test_labels)} clouds; merged model agrees "
          f"on {int((merged == before).sum())}/{len(before)}; adapter saved to {out / 'clora.pth'}")
    restored = load_adapter(backbone(args), out / "clora.pth")
    same = (predictions(restored, test_points) == before).float().mean().item()
    print(f"reloaded adapter reproduces {100 * same:.1f}% of the predictions")
    return accuracy


if __name__ == "__main__":
    main()
