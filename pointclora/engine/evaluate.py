"""Test-split evaluation, sharded over ranks, with optional multi-view voting.

Evaluation runs under its own seeded RNG, so a stochastic test transform gives the same
numbers during training and in `tools/test.py`, and never shifts the training stream.
"""
from __future__ import annotations

import sys

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from pointclora.data import build_batch_transform, protocol_description

from .build import amp_dtype, build_datasets
from .checkpoint import restore_model, seed_everything
from .distributed import DistInfo, all_gather_object


@torch.no_grad()
def predict(model: nn.Module, dataset: Dataset, transform, info: DistInfo, batch_size: int,
            views: int = 1, vote_transform=None, seed: int = 0, num_workers: int = 0,
            amp_dtype: torch.dtype | None = None, progress: bool = False):
    """(logits (N, C) averaged over views, labels (N,)) for the whole dataset, on every rank.

    With `views > 1` every view goes through `vote_transform`; otherwise `transform`.
    """
    if views < 1:
        raise ValueError(f"views must be >= 1, got {views}")
    if views > 1 and vote_transform is None:
        raise ValueError("voting needs a vote_transform")
    view_tf = vote_transform if views > 1 else transform
    shard = Subset(dataset, range(info.rank, len(dataset), info.world_size))
    loader = DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=info.device.type == "cuda",
                        generator=torch.Generator().manual_seed(seed))
    was_training = model.training
    model.eval()
    logits, labels = [], []
    devices = [info.device] if info.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for points, label in tqdm(loader, desc="test", leave=False, disable=not progress):
            points = points.to(info.device, non_blocking=True)
            total = 0
            for _ in range(views):
                with torch.autocast(info.device.type, dtype=amp_dtype or torch.float32,
                                    enabled=amp_dtype is not None):
                    total = total + model(view_tf(points)).float()
            logits.append((total / views).cpu())
            labels.append(torch.as_tensor(label).cpu())
    model.train(was_training)
    local = (torch.cat(logits), torch.cat(labels)) if logits else (torch.empty(0, 0),
                                                                     torch.empty(0))
    parts = all_gather_object(local)
    # Rank r holds items r, r + W, r + 2W, ...: interleave back to dataset order.
    n, width = len(dataset), max(part[0].shape[1] for part in parts)
    all_logits = torch.empty(n, width)
    all_labels = torch.empty(n, dtype=torch.long)
    for rank, (part_logits, part_labels) in enumerate(parts):
        all_logits[rank::info.world_size] = part_logits
        all_labels[rank::info.world_size] = part_labels
    return all_logits, all_labels


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Overall accuracy in percent."""
    return 100.0 * (logits.argmax(1) == labels).sum().item() / len(labels)


def evaluate_checkpoint(cfg: dict, ckpt: dict, info: DistInfo, views: int = 1,
                        batch_size: int | None = None) -> dict:
    """Test accuracy of a training checkpoint, computed exactly as during training.

    With `views > 1` each shape is seen through `views` draws of the "vote" transform and
    the logits are averaged (the ModelNet40 voting protocol).
    """
    tcfg = cfg["train"]
    seed_everything(tcfg["seed"])
    test_set = build_datasets(cfg, ("test",))["test"]
    model, _ = restore_model(cfg, ckpt)
    model.to(info.device)
    vote_tf = build_batch_transform(cfg["data"], "vote") if views > 1 else None
    logits, labels = predict(
        model, test_set, build_batch_transform(cfg["data"], "test"), info,
        batch_size or max(tcfg["batch_size"] // info.world_size, 1), views=views,
        vote_transform=vote_tf, seed=tcfg["seed"], num_workers=tcfg["num_workers"],
        amp_dtype=amp_dtype(cfg, info.device),
        progress=info.is_main and sys.stderr.isatty(),
    )
    return {"acc": accuracy(logits, labels), "views": views, "samples": len(test_set),
            "epoch": ckpt.get("epoch"), "method": cfg["adapter"]["method"],
            "protocol": protocol_description(cfg["data"])}
