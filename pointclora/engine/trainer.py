"""The fine-tuning loop: one config, one run directory, one `metrics.json`.

`fit` reads as its steps: `_setup` builds the run (folder, data, model, optimiser; on resume
all of it from `checkpoints/last.pth`), `_announce` logs what runs, then each epoch is
`_train_epoch` (`_optimise` per batch), `_evaluate` and `_save`, and `_finish` writes
`metrics.json` and the figures. The task (`tasks.py`) supplies the batch handling, the loss,
the metrics and what "best" means; `Run` holds the built pieces and `RunState` what changes
as training goes.

Runs as a single process or under `torchrun` (DDP); rank 0 alone writes files. A run
resumed from `checkpoints/last.pth` continues bit for bit: model, optimiser, scheduler,
grad scaler, every rank's RNG states, epoch, best metric and elapsed time are restored.

SIGINT (Ctrl-C) and SIGTERM (what schedulers send) stop the run at once, except while an
epoch whose training pass has finished is evaluated and saved: that completes first. Under
DDP every rank stops at the same batch (see `_Signals`). `fit` then raises
`TrainingInterrupted`; `tools/train.py` prints the resume command and exits with 128 + the
signal number.
"""
from __future__ import annotations

import contextlib
import json
import logging
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from pointclora.adapters import parameter_report, regularization_loss
from pointclora.config import dump_config

from .build import (
    DERIVED,
    absolute_paths,
    amp_dtype,
    build_datasets,
    build_run_model,
    resolve_config,
    run_warnings,
)
from .checkpoint import (
    load_checkpoint,
    model_payload,
    restore_model,
    resume_changes,
    rng_state,
    save_checkpoint,
    seed_everything,
    set_rng_state,
)
from .distributed import DistInfo, all_gather_object, barrier, broadcast_buffers, on_main
from .evaluate import collect
from .optim import build_optimizer
from .plots import plot_curves
from .recorder import Recorder, get_logger
from .rundir import (
    BEST_CKPT,
    CKPT_DIR,
    CONFIG_NAME,
    LAST_CKPT,
    prepare_run_dir,
    release_run_dir,
)
from .schedule import build_scheduler
from .tasks import Task, build_task, forward

METRICS_NAME = "metrics.json"
CURVES_NAME = "curves.png"
logger = logging.getLogger("pointclora")


class TrainingInterrupted(Exception):
    """A run stopped by SIGINT or SIGTERM; `exit_code` is 128 + the signal number."""

    def __init__(self, signum: int, run_dir: Path, saved_epoch: int | None):
        self.signal_name = signal.Signals(signum).name
        self.exit_code = 128 + signum
        self.run_dir = run_dir
        self.resumable = (run_dir / CKPT_DIR / LAST_CKPT).is_file()
        saved = (f"epochs up to {saved_epoch} are saved in {run_dir / CKPT_DIR / LAST_CKPT}"
                 if saved_epoch is not None and self.resumable else
                 "no epoch of this attempt was saved")
        super().__init__(f"training stopped by {self.signal_name}; {saved}")


class _Stop(BaseException):
    """Raised in the main thread by a signal (a BaseException, like KeyboardInterrupt)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class _Signals:
    """SIGINT/SIGTERM stop the run: at once in a single process, except inside `deferred()`,
    whose end the first signal waits for. Under DDP a signal is only noted and every rank
    stops together at the next `check()` (once per batch and after each save), so no rank
    is left waiting in a collective for one that has gone. A second signal never waits."""

    def __init__(self, info: DistInfo):
        self.collective, self.device = info.distributed, info.device
        self.depth, self.pending, self.previous = 0, None, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if self.pending is None and (self.depth or self.collective):
            self.pending = signum
            return
        raise _Stop(signum)

    def check(self) -> None:
        """Raise `_Stop` if a signal is pending (on any rank, under DDP)."""
        signum = self.pending or 0
        if self.collective:
            flag = torch.tensor([signum], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            signum = int(flag.item())
        if signum:
            raise _Stop(signum)

    @contextlib.contextmanager
    def deferred(self):
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
        if not self.depth:
            self.check()


@dataclass
class RunState:
    """What changes as training goes; checkpoints carry it and resume restores it."""

    epoch: int = 0                  # the next epoch to train
    best: dict | None = None        # metrics of the best evaluation, with its "epoch"
    last: dict | None = None        # metrics of the latest evaluation, with its "epoch"
    elapsed: float = 0.0            # seconds spent by earlier attempts
    changes: list = field(default_factory=list)  # config changes made on resume


@dataclass
class Run:
    """The pieces one training process works with, built once by `_setup`."""

    cfg: dict                       # the user's config + `derived`, paths absolute
    run_dir: Path
    info: DistInfo
    task: Task
    datasets: dict
    core: nn.Module                 # the model: checkpoints and evaluation use it
    model: nn.Module                # what the training step calls: `core` or DDP(core)
    init_backbone: dict | None
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler
    dtype: torch.dtype | None       # autocast dtype, None for float32
    batch_size: int                 # per process
    loader: DataLoader
    sampler: DistributedSampler | None
    transforms: dict                # "train" and "test" batch transforms of the task
    recorder: Recorder
    state: RunState
    warnings: list[str]
    started: float                  # time.time() when this process started the run
    start_epoch: int = 0            # the first epoch this process trains

    @property
    def tcfg(self) -> dict:
        return self.cfg["train"]


def _seed_worker(worker_id: int) -> None:
    """NumPy in loader workers: torch seeds python/torch per worker, not NumPy."""
    np.random.seed(torch.initial_seed() % 2**32)


def _progress(info: DistInfo) -> bool:
    return info.is_main and sys.stderr.isatty()


def fit(cfg: dict, run_dir: str | Path, info: DistInfo, resume: bool = False,
        exist_ok: bool = False, trust_pickle: bool = False) -> dict:
    """Train and evaluate as `cfg` says, writing everything under `run_dir`; returns metrics.

    `trust_pickle` lets `model.pretrained` be unpickled in full (`--trust-pickle`).
    """
    run_dir, run = Path(run_dir), None
    try:
        with _Signals(info) as signals:
            run = _setup(cfg, run_dir, info, resume, exist_ok, trust_pickle)
            _announce(run)
            for epoch in range(run.state.epoch, run.tcfg["epochs"]):
                tic = time.time()
                row = _train_epoch(run, epoch, signals.check)
                with signals.deferred():  # a finished pass is always evaluated and saved
                    is_best = _evaluate(run, epoch, row)
                    row["epoch_time"] = time.time() - tic
                    _save(run, epoch, row, is_best)
            return _finish(run)
    except _Stop as stop:
        if run is not None:
            run.recorder.close()
        saved = run.state.epoch - 1 if run is not None and run.state.epoch else None
        err = TrainingInterrupted(stop.signum, run_dir, saved)
        logger.warning("%s", err)
        raise err from None
    finally:
        release_run_dir(run_dir)  # the folder is free for the next process once fit returns


def _setup(cfg: dict, run_dir: Path, info: DistInfo, resume: bool, exist_ok: bool,
           trust_pickle: bool) -> Run:
    """Run folder and logger, data, model, optimiser; the saved state when resuming."""
    started = time.time()
    cfg = absolute_paths(dict(cfg, output_dir=str(run_dir)))
    on_main(info, prepare_run_dir, run_dir, resume=resume, exist_ok=exist_ok)
    get_logger(run_dir if info.is_main else None, enabled=info.is_main)
    tcfg = cfg["train"]
    seed_everything(tcfg["seed"] + info.rank)

    datasets = build_datasets(cfg)
    cfg = resolve_config(cfg, datasets)
    task = build_task(cfg)
    batch_size = _local_batch_size(tcfg, info, len(datasets["train"]))
    ckpt = load_checkpoint(run_dir / CKPT_DIR / LAST_CKPT) if resume else None
    if ckpt is not None:
        core, init_backbone = restore_model(cfg, ckpt, trust_pickle)
    else:
        core, init_backbone = build_run_model(cfg, trust_pickle)
    core = core.to(info.device)
    dtype = amp_dtype(cfg, info.device)
    optimizer = build_optimizer(core, tcfg)
    scheduler = build_scheduler(optimizer, tcfg)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    state, rng = RunState(), None
    if ckpt is not None:
        state, rng = _restore_state(ckpt, cfg, info, optimizer, scheduler, scaler)
    model = (DistributedDataParallel(core, device_ids=[info.local_rank]
                                     if info.device.type == "cuda" else None)
             if info.distributed else core)
    if info.is_main:
        (run_dir / CKPT_DIR).mkdir(exist_ok=True)
        if ckpt is None:  # a resumed run rewrites it once its first new epoch is saved
            dump_config(cfg, run_dir / CONFIG_NAME)
    sampler = (DistributedSampler(datasets["train"], info.world_size, info.rank, shuffle=True,
                                  seed=tcfg["seed"], drop_last=True)
               if info.distributed else None)
    loader = DataLoader(datasets["train"], batch_size=batch_size, shuffle=sampler is None,
                        sampler=sampler, drop_last=True, num_workers=tcfg["num_workers"],
                        worker_init_fn=_seed_worker, pin_memory=info.device.type == "cuda")
    run = Run(cfg=cfg, run_dir=run_dir, info=info, task=task, datasets=datasets, core=core,
              model=model, init_backbone=init_backbone, optimizer=optimizer,
              scheduler=scheduler, scaler=scaler, dtype=dtype, batch_size=batch_size,
              loader=loader, sampler=sampler,
              transforms={mode: task.transform(mode) for mode in ("train", "test")},
              recorder=Recorder(run_dir, enabled=info.is_main, start_epoch=state.epoch,
                                fields=_csv_fields(task)),
              state=state, warnings=run_warnings(cfg), started=started,
              start_epoch=state.epoch)
    if rng is not None:  # last, so that nothing built above shifts the restored streams
        set_rng_state(rng)
    return run


def _local_batch_size(tcfg: dict, info: DistInfo, train_size: int) -> int:
    if tcfg["batch_size"] % info.world_size:
        raise ValueError(f"train.batch_size={tcfg['batch_size']} is the global batch; it must "
                         f"divide evenly over the {info.world_size} processes")
    if train_size < tcfg["batch_size"]:
        raise ValueError(f"the train split has {train_size} samples, fewer than "
                         f"train.batch_size={tcfg['batch_size']} (incomplete batches are dropped)")
    return tcfg["batch_size"] // info.world_size


def _restore_state(ckpt: dict, cfg: dict, info: DistInfo, optimizer, scheduler, scaler
                   ) -> tuple[RunState, dict | None]:
    """Optimiser, scheduler and scaler from `ckpt` in place; (run state, this rank's RNG)."""
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    scaler.load_state_dict(ckpt["scaler"])
    epoch = ckpt["epoch"] + 1
    rng = None
    if len(ckpt["rng"]) == info.world_size:
        rng = ckpt["rng"][info.rank]
    else:
        logger.warning("resuming on %d processes a run saved on %d: the random streams "
                       "are reseeded, so results will not match an uninterrupted run",
                       info.world_size, len(ckpt["rng"]))
        seed_everything(cfg["train"]["seed"] + info.rank + 1000 * epoch)
    changes = resume_changes(ckpt, cfg, epoch)
    new = [c for c in changes if c["epoch"] == epoch]
    if new:
        logger.warning("resuming with a changed config from epoch %d: %s", epoch,
                       "; ".join(f"{c['key']}: {c['old']!r} -> {c['new']!r}" for c in new))
    return RunState(epoch=epoch, best=ckpt["best_metrics"], last=ckpt["metrics"],
                    elapsed=ckpt["elapsed"], changes=changes), rng


def _csv_fields(task: Task) -> tuple[str, ...]:
    return ("epoch", "lr", "train_loss", "train_acc",
            *(f"test_{key}" for key in task.log_metrics), "epoch_time")


def _announce(run: Run) -> None:
    cfg, info = run.cfg, run.info
    params = parameter_report(run.core)
    logger.info("run %s: %s on %s (%s), method %s, %d process%s on %s", run.run_dir,
                cfg["model"]["name"], cfg["data"]["name"], run.task.name,
                cfg["adapter"]["method"], info.world_size, "es" if info.distributed else "",
                info.device)
    logger.info("protocol: %s", run.task.protocol())
    logger.info("parameters: %s trainable of %s (%s without the head)",
                f"{params['trainable']:,}", f"{params['total']:,}",
                f"{params['trainable_no_head']:,}")
    if cfg[DERIVED]:
        logger.info("derived from the data: %s", cfg[DERIVED])
    for text in run.warnings:
        logger.warning("WARNING: %s", text)
    if run.start_epoch:
        logger.info("resumed from %s at epoch %d", run.run_dir / CKPT_DIR / LAST_CKPT,
                    run.state.epoch)


def _train_epoch(run: Run, epoch: int, check_stop=lambda: None) -> dict:
    """One pass over the training split; the epoch's log row (loss, train_acc) over all ranks.

    `check_stop()` runs before each batch (it raises when the run must stop)."""
    info, task, tcfg = run.info, run.task, run.tcfg
    if run.sampler is not None:
        run.sampler.set_epoch(epoch)
    lr = run.optimizer.param_groups[0]["lr"]
    run.model.train()
    params = [p for p in run.core.parameters() if p.requires_grad]
    totals = torch.zeros(4, dtype=torch.float64)  # loss * samples, samples, correct, counted
    desc = f"epoch {epoch}/{tcfg['epochs']}"
    for batch in tqdm(run.loader, desc=desc, leave=False, disable=not _progress(info)):
        check_stop()
        inputs, target = task.prepare(batch, info.device, run.transforms["train"])
        output = forward(run.model, inputs, info.device, run.dtype)
        loss = task.loss(output, target) + regularization_loss(run.core)
        _optimise(run, loss, params)
        n = target.shape[0]
        correct, counted = task.train_counts(output, target)
        totals += torch.tensor([loss.item() * n, n, correct, counted], dtype=torch.float64)
    if info.distributed:
        totals = sum(all_gather_object(totals))
    run.scheduler.step()
    loss_sum, samples, correct, counted = totals.tolist()
    return {"epoch": epoch, "lr": lr, "train_loss": loss_sum / samples,
            "train_acc": 100.0 * correct / counted}


def _optimise(run: Run, loss: torch.Tensor, params: list) -> None:
    """Backward, gradient-norm clip (`train.grad_clip`), optimiser step, through the scaler."""
    tcfg = run.tcfg
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    if tcfg.get("double_step"):  # the official part-segmentation loop: a step before clipping
        run.optimizer.step()
    if tcfg["grad_clip"]:
        run.scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_(params, tcfg["grad_clip"])
    run.scaler.step(run.optimizer)
    run.scaler.update()


def _evaluate(run: Run, epoch: int, row: dict) -> bool:
    """Test the model when due (every `val_every` epochs and after the last); adds the test
    metrics to `row`, updates the run state; whether this is the best evaluation so far."""
    tcfg, state, task = run.tcfg, run.state, run.task
    if (epoch + 1) % tcfg["val_every"] and epoch != tcfg["epochs"] - 1:
        return False
    # DDP keeps buffers (BatchNorm statistics) per process; rank 0's are the ones saved,
    # so every rank evaluates with them (training is unaffected: DDP broadcasts rank 0's
    # buffers before each forward anyway).
    broadcast_buffers(run.core)
    test_set = run.datasets["test"]
    records = collect(run.core, test_set, task, run.transforms["test"], run.info,
                      run.batch_size, seed=tcfg["seed"], num_workers=tcfg["num_workers"],
                      amp_dtype=run.dtype, progress=_progress(run.info))
    metrics = task.metrics(records, test_set.class_names)
    row.update({f"test_{key}": metrics[key] for key in task.log_metrics})
    state.last = {**metrics, "epoch": epoch}
    key = task.best_metric
    is_best = state.best is None or metrics[key] > state.best[key]
    if is_best:
        state.best = state.last
    return is_best


def _save(run: Run, epoch: int, row: dict, is_best: bool) -> None:
    """Log row, then `best.pth` (when best) and `last.pth`; rank 0 writes, all ranks log."""
    info, state = run.info, run.state
    rngs = all_gather_object(rng_state())
    state.epoch = epoch + 1
    if info.is_main:
        # The log row first: a kill before last.pth is replaced re-runs this epoch on
        # resume (rows from the resumed epoch on are dropped), so log and checkpoint agree.
        run.recorder.log_epoch(row)
        payload = {"config": run.cfg, "changes": state.changes, "task": run.task.name,
                   "method": run.cfg["adapter"]["method"], "epoch": epoch,
                   "class_names": list(getattr(run.datasets["test"], "class_names", [])),
                   "metrics": state.last, "best_metrics": state.best,
                   "elapsed": state.elapsed + time.time() - run.started,
                   **model_payload(run.core, run.cfg, run.init_backbone)}
        ckpt_dir = run.run_dir / CKPT_DIR
        if is_best:
            save_checkpoint(payload, ckpt_dir / BEST_CKPT)
        save_checkpoint({**payload, "optimizer": run.optimizer.state_dict(),
                         "scheduler": run.scheduler.state_dict(),
                         "scaler": run.scaler.state_dict(), "rng": rngs},
                        ckpt_dir / LAST_CKPT)
        if state.changes and epoch == run.start_epoch:
            dump_config(run.cfg, run.run_dir / CONFIG_NAME, state.changes)
    test_text = ""
    if f"test_{run.task.best_metric}" in row:
        key = run.task.best_metric
        test_text = (f" test {run.task.summary(state.last)} (best {key} "
                     f"{state.best[key]:.2f} @ {state.best['epoch']})")
    logger.info("epoch %d/%d loss %.4f lr %.3e train_acc %.2f%s time %.1fs", epoch,
                run.tcfg["epochs"], row["train_loss"], row["lr"], row["train_acc"], test_text,
                row["epoch_time"])


def _finish(run: Run) -> dict:
    """`metrics.json`, curves and the task's figures; the metrics dict."""
    run.recorder.close()
    cfg, task, state, info = run.cfg, run.task, run.state, run.info
    best, last = state.best, state.last
    class_names = list(run.datasets["test"].class_names)
    metrics = {
        "task": task.name, "best_metric": task.best_metric,
        **{f"best_{key}": best.get(key) for key in task.log_metrics},
        "best_epoch": best["epoch"],
        **{f"final_{key}": last.get(key) for key in task.log_metrics},
        "final_epoch": last["epoch"],
        "method": cfg["adapter"]["method"], "backbone": cfg["model"]["name"],
        "pretrained": cfg["model"].get("pretrained"), "dataset": cfg["data"]["name"],
        "protocol": task.protocol(),
        "voting": "none (tools/test.py --vote N evaluates with voting)",
        "parameters": parameter_report(run.core), "epochs": run.tcfg["epochs"],
        "world_size": info.world_size, "device": str(info.device),
        "amp": str(run.dtype).replace("torch.", "") if run.dtype else None,
        "wall_time_s": round(state.elapsed + time.time() - run.started, 2),
        "derived": cfg[DERIVED], "warnings": run.warnings,
        "config_changes": state.changes,
        "details_epoch": best["epoch"], **task.details(best, class_names),
    }
    if info.is_main:
        (run.run_dir / METRICS_NAME).write_text(json.dumps(metrics, indent=2) + "\n")
        plot_curves(run.recorder.rows, run.run_dir / CURVES_NAME)
        task.figures(best, class_names, run.run_dir,
                     f"test split, best epoch {best['epoch']} ({task.summary(best)})")
        logger.info("best test %s at epoch %d; final %s; wall time %.0fs; outputs in %s",
                    task.summary(best), best["epoch"], task.summary(last),
                    metrics["wall_time_s"], run.run_dir)
        for text in run.warnings:
            logger.warning("WARNING: %s", text)
    barrier()
    return metrics
