"""Test-split evaluation, sharded over ranks, with optional multi-view voting.

Evaluation runs under its own seeded RNG, so a stochastic test transform gives the same
numbers during training and in `tools/test.py`, and never shifts the training stream.
"""
from __future__ import annotations

import sys

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from .build import amp_dtype, build_datasets, resolve_config
from .checkpoint import restore_model, seed_everything
from .distributed import DistInfo, all_gather_object
from .tasks import ClassificationTask, Task, build_task, forward


@torch.no_grad()
def collect(model: nn.Module, dataset: Dataset, task: Task, transform, info: DistInfo,
            batch_size: int, views: int = 1, vote_transform=None, seed: int = 0,
            num_workers: int = 0, amp_dtype: torch.dtype | None = None,
            progress: bool = False) -> dict:
    """The task's per-sample records for the whole dataset, in dataset order, on every rank.

    With `views > 1` every view goes through `vote_transform` and the model outputs are
    averaged over the views; otherwise `transform`.
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
    parts: dict[str, list] = {}
    devices = [info.device] if info.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for batch in tqdm(loader, desc="test", leave=False, disable=not progress):
            total = 0
            for _ in range(views):
                inputs, target = task.prepare(batch, info.device, view_tf)
                total = total + forward(model, inputs, info.device, amp_dtype).float()
            for key, value in task.records(total / views, target, inputs).items():
                parts.setdefault(key, []).append(value)
    model.train(was_training)
    local = {key: torch.cat(values) for key, values in parts.items()}
    return _interleave(all_gather_object(local), len(dataset), info.world_size)


def _interleave(parts: list[dict], n: int, world_size: int) -> dict:
    """Rank r holds items r, r + W, r + 2W, ...: put them back in dataset order."""
    full = next(part for part in parts if part)
    out = {key: torch.empty((n, *value.shape[1:]), dtype=value.dtype)
           for key, value in full.items()}
    for rank, part in enumerate(parts):
        for key, value in part.items():
            out[key][rank::world_size] = value
    return out


def predict(model: nn.Module, dataset: Dataset, transform, info: DistInfo, batch_size: int,
            **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (N, C) averaged over views, labels (N,)) of a classifier; see `collect`."""
    records = collect(model, dataset, ClassificationTask(), transform, info, batch_size,
                      **kwargs)
    return records["logits"], records["label"]


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Overall accuracy in percent."""
    return 100.0 * (logits.argmax(1) == labels).sum().item() / len(labels)


def evaluate_checkpoint(cfg: dict, ckpt: dict, info: DistInfo, views: int = 1,
                        batch_size: int | None = None, repeats: int = 1,
                        trust_pickle: bool = False) -> dict:
    """Test metrics of a training checkpoint, computed exactly as during training.

    With `views > 1` each sample is seen through `views` draws of the "vote" transform and
    the outputs are averaged (the ModelNet40 voting protocol). With `repeats > 1` the voted
    evaluation is repeated with seeds `seed, seed + 1, ...` and the repeat with the best
    `best_metric` is reported (the official Point-BERT/Point-MAE `test_vote` protocol, which
    selects on the test set), together with the mean and std over the repeats.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    tcfg = cfg["train"]
    seed_everything(tcfg["seed"])
    test_set = build_datasets(cfg, ("test",))["test"]
    cfg = resolve_config(cfg, {"test": test_set})
    task = build_task(cfg)
    model, _ = restore_model(cfg, ckpt, trust_pickle)
    model.to(info.device)
    vote_tf = task.transform("vote") if views > 1 else None
    runs = []
    for repeat in range(repeats):
        records = collect(
            model, test_set, task, task.transform("test"), info,
            batch_size or max(tcfg["batch_size"] // info.world_size, 1), views=views,
            vote_transform=vote_tf, seed=tcfg["seed"] + repeat,
            num_workers=tcfg["num_workers"], amp_dtype=amp_dtype(cfg, info.device),
            progress=info.is_main and sys.stderr.isatty(),
        )
        runs.append(task.metrics(records, test_set.class_names))
    key = task.best_metric
    chosen = max(range(repeats), key=lambda r: runs[r][key])
    metrics = runs[chosen]
    result = {**{k: metrics[k] for k in task.log_metrics},
              **task.details(metrics, test_set.class_names),
              "summary": task.summary(metrics), "task": task.name, "views": views,
              "repeats": repeats,
              "voting": voting_name(views, repeats), "samples": len(test_set),
              "epoch": ckpt.get("epoch"), "method": cfg["adapter"]["method"],
              "protocol": task.protocol()}
    if repeats > 1:
        values = np.array([run[key] for run in runs])
        result["repeat_stats"] = {"metric": key, "best_repeat": chosen,
                                  "mean": float(values.mean()), "std": float(values.std()),
                                  "min": float(values.min()), "max": float(values.max())}
    return result


def voting_name(views: int, repeats: int) -> str:
    """How the numbers were obtained, in words that cannot be mistaken for single-pass ones."""
    if views == 1 and repeats == 1:
        return "none (single pass)"
    text = f"{views}-view voting"
    if repeats > 1:
        text = (f"best of {repeats} repeats of {text} (selected on the test set, as the "
                "official test_vote does: optimistic)")
    return text
