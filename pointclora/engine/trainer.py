"""The fine-tuning loop: one config, one run directory, one `metrics.json`.

Runs as a single process or under `torchrun` (DDP); rank 0 alone writes files. A run
resumed from `checkpoints/last.pth` continues bit for bit: model, optimiser, scheduler,
grad scaler, every rank's RNG states, epoch, best metric and elapsed time are restored.
"""
from __future__ import annotations

import copy
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from pointclora.adapters import parameter_report, regularization_loss
from pointclora.config import dump_config
from pointclora.data import build_batch_transform, protocol_description

from .build import amp_dtype, build_datasets, build_run_model
from .checkpoint import (
    load_checkpoint,
    model_payload,
    restore_model,
    rng_state,
    save_checkpoint,
    seed_everything,
    set_rng_state,
)
from .distributed import DistInfo, all_gather_object, barrier, on_main
from .evaluate import accuracy, predict
from .optim import build_optimizer
from .plots import confusion_matrix, plot_confusion, plot_curves
from .recorder import Recorder, get_logger
from .rundir import BEST_CKPT, CKPT_DIR, CONFIG_NAME, LAST_CKPT, prepare_run_dir
from .schedule import build_scheduler

METRICS_NAME = "metrics.json"
CURVES_NAME = "curves.png"
CONFUSION_NAME = "confusion.png"
logger = logging.getLogger("pointclora")


def _seed_worker(worker_id: int) -> None:
    """NumPy in loader workers: torch seeds python/torch per worker, not NumPy."""
    np.random.seed(torch.initial_seed() % 2**32)


def _progress(info: DistInfo) -> bool:
    return info.is_main and sys.stderr.isatty()


def _config_changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = sorted(set(old) | set(new))
    out = []
    for key in keys:
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _config_changes(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def _train_epoch(model, core, loader, transform, optimizer, scaler, cfg_train, info, dtype,
                 desc):
    """One pass over the training split; returns (mean loss, accuracy %) over all ranks."""
    model.train()
    params = [p for p in core.parameters() if p.requires_grad]
    totals = torch.zeros(3, dtype=torch.float64)  # loss * n, correct, n
    for points, labels in tqdm(loader, desc=desc, leave=False, disable=not _progress(info)):
        points = transform(points.to(info.device, non_blocking=True))
        labels = labels.to(info.device, non_blocking=True)
        with torch.autocast(info.device.type, dtype=dtype or torch.float32,
                            enabled=dtype is not None):
            logits = model(points)
        loss = F.cross_entropy(logits.float(), labels) + regularization_loss(core)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg_train["grad_clip"]:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, cfg_train["grad_clip"])
        scaler.step(optimizer)
        scaler.update()
        n = labels.numel()
        totals += torch.tensor([loss.item() * n, (logits.argmax(1) == labels).sum().item(), n],
                               dtype=torch.float64)
    if info.distributed:
        totals = sum(all_gather_object(totals))
    loss_sum, correct, count = totals.tolist()
    return loss_sum / count, 100.0 * correct / count


def fit(cfg: dict, run_dir: str | Path, info: DistInfo, resume: bool = False,
        exist_ok: bool = False) -> dict:
    """Train and evaluate as `cfg` says, writing everything under `run_dir`; returns metrics."""
    start_time = time.time()
    run_dir = Path(run_dir)
    cfg = copy.deepcopy(dict(cfg, output_dir=str(run_dir)))
    on_main(info, prepare_run_dir, run_dir, resume=resume, exist_ok=exist_ok)
    get_logger(run_dir if info.is_main else None, enabled=info.is_main)
    tcfg = cfg["train"]
    seed_everything(tcfg["seed"] + info.rank)

    datasets = build_datasets(cfg)
    train_set, test_set = datasets["train"], datasets["test"]
    if tcfg["batch_size"] % info.world_size:
        raise ValueError(f"train.batch_size={tcfg['batch_size']} is the global batch; it must "
                         f"divide evenly over the {info.world_size} processes")
    batch_size = tcfg["batch_size"] // info.world_size
    if len(train_set) < tcfg["batch_size"]:
        raise ValueError(f"the train split has {len(train_set)} samples, fewer than "
                         f"train.batch_size={tcfg['batch_size']} (incomplete batches are dropped)")

    ckpt = load_checkpoint(run_dir / CKPT_DIR / LAST_CKPT) if resume else None
    if ckpt is not None:
        model, init_backbone = restore_model(cfg, ckpt)
    else:
        model, init_backbone = build_run_model(cfg)
    core = model.to(info.device)
    dtype = amp_dtype(cfg, info.device)
    optimizer = build_optimizer(core, tcfg)
    scheduler = build_scheduler(optimizer, tcfg)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    start_epoch, best, elapsed, last, rng = 0, None, 0.0, None, None
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        start_epoch, best, last = ckpt["epoch"] + 1, ckpt["best_metrics"], ckpt["metrics"]
        elapsed = ckpt["elapsed"]
        if len(ckpt["rng"]) == info.world_size:
            rng = ckpt["rng"][info.rank]
        else:
            logger.warning("resuming on %d processes a run saved on %d: the random streams "
                           "are reseeded, so results will not match an uninterrupted run",
                           info.world_size, len(ckpt["rng"]))
            seed_everything(tcfg["seed"] + info.rank + 1000 * start_epoch)
        saved_cfg = ckpt["config"]
        changes = _config_changes(saved_cfg, cfg)
        if changes:
            logger.warning("resuming with a changed config: %s", "; ".join(changes))
    model = (DistributedDataParallel(core, device_ids=[info.local_rank]
                                     if info.device.type == "cuda" else None)
             if info.distributed else core)

    if info.is_main:
        (run_dir / CKPT_DIR).mkdir(exist_ok=True)
        dump_config(cfg, run_dir / CONFIG_NAME)
    protocol = protocol_description(cfg["data"])
    params = parameter_report(core)
    method = cfg["adapter"]["method"]
    logger.info("run %s: %s on %s, method %s, %d process%s on %s", run_dir,
                cfg["model"]["name"], cfg["data"]["name"], method, info.world_size,
                "es" if info.distributed else "", info.device)
    logger.info("protocol: %s", protocol)
    logger.info("parameters: %s trainable of %s (%s without the head)",
                f"{params['trainable']:,}", f"{params['total']:,}",
                f"{params['trainable_no_head']:,}")
    if start_epoch:
        logger.info("resumed from %s at epoch %d", run_dir / CKPT_DIR / LAST_CKPT, start_epoch)

    sampler = (DistributedSampler(train_set, info.world_size, info.rank, shuffle=True,
                                  seed=tcfg["seed"], drop_last=True)
               if info.distributed else None)
    loader = DataLoader(train_set, batch_size=batch_size, shuffle=sampler is None,
                        sampler=sampler, drop_last=True, num_workers=tcfg["num_workers"],
                        worker_init_fn=_seed_worker, pin_memory=info.device.type == "cuda")
    train_tf = build_batch_transform(cfg["data"], "train")
    test_tf = build_batch_transform(cfg["data"], "test")
    recorder = Recorder(run_dir, enabled=info.is_main, start_epoch=start_epoch)
    epochs = tcfg["epochs"]
    if rng is not None:  # last, so that nothing built above shifts the restored streams
        set_rng_state(rng)
    for epoch in range(start_epoch, epochs):
        tic = time.time()
        if sampler is not None:
            sampler.set_epoch(epoch)
        lr = optimizer.param_groups[0]["lr"]
        loss, train_acc = _train_epoch(model, core, loader, train_tf, optimizer, scaler, tcfg,
                                       info, dtype, f"epoch {epoch}/{epochs}")
        scheduler.step()
        row = {"epoch": epoch, "lr": lr, "train_loss": loss, "train_acc": train_acc}
        is_best = False
        if (epoch + 1) % tcfg["val_every"] == 0 or epoch == epochs - 1:
            logits, labels = predict(core, test_set, test_tf, info, batch_size,
                                     seed=tcfg["seed"], num_workers=tcfg["num_workers"],
                                     amp_dtype=dtype, progress=_progress(info))
            row["test_acc"] = acc = accuracy(logits, labels)
            last = {"acc": acc, "epoch": epoch}
            is_best = best is None or acc > best["acc"]
            if is_best:
                matrix = confusion_matrix(labels.numpy(), logits.argmax(1).numpy(),
                                          test_set.num_classes)
                best = {"acc": acc, "epoch": epoch, "confusion": torch.from_numpy(matrix)}
        row["epoch_time"] = time.time() - tic
        rngs = all_gather_object(rng_state())
        if info.is_main:
            payload = {"config": cfg, "method": method, "epoch": epoch, "metrics": last,
                       "best_metrics": best, "elapsed": elapsed + time.time() - start_time,
                       **model_payload(core, cfg, init_backbone)}
            if is_best:
                save_checkpoint(payload, run_dir / CKPT_DIR / BEST_CKPT)
            save_checkpoint({**payload, "optimizer": optimizer.state_dict(),
                             "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                             "rng": rngs}, run_dir / CKPT_DIR / LAST_CKPT)
            recorder.log_epoch(row)
        test_text = (f" test_acc {row['test_acc']:.2f} (best {best['acc']:.2f} @ {best['epoch']})"
                     if "test_acc" in row else "")
        logger.info("epoch %d/%d loss %.4f lr %.3e train_acc %.2f%s time %.1fs", epoch, epochs,
                    loss, lr, train_acc, test_text, row["epoch_time"])
    recorder.close()

    metrics = {
        "best_acc": best["acc"], "best_epoch": best["epoch"],
        "final_acc": last["acc"], "final_epoch": last["epoch"],
        "method": method, "backbone": cfg["model"]["name"],
        "pretrained": cfg["model"].get("pretrained"), "dataset": cfg["data"]["name"],
        "protocol": protocol, "voting": "none (tools/test.py --vote N evaluates with voting)",
        "parameters": params, "epochs": epochs, "world_size": info.world_size,
        "device": str(info.device), "amp": str(dtype).replace("torch.", "") if dtype else None,
        "wall_time_s": round(elapsed + time.time() - start_time, 2),
    }
    if info.is_main:
        (run_dir / METRICS_NAME).write_text(json.dumps(metrics, indent=2) + "\n")
        plot_curves(recorder.rows, run_dir / CURVES_NAME)
        plot_confusion(best["confusion"].numpy(), list(test_set.class_names),
                       run_dir / CONFUSION_NAME,
                       title=f"test split, best epoch {best['epoch']} ({best['acc']:.2f}%)")
        logger.info("best test accuracy %.2f%% (epoch %d), final %.2f%%, wall time %.0fs; "
                    "outputs in %s", best["acc"], best["epoch"], last["acc"],
                    metrics["wall_time_s"], run_dir)
    barrier()
    return metrics
