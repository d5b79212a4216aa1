"""What a run leaves behind: a text log, per-epoch CSV rows and TensorBoard scalars.

Only rank 0 records; other ranks get a recorder that drops everything.
"""
from __future__ import annotations

import csv
import logging
import sys
from pathlib import Path

LOG_NAME = "train.log"
CSV_NAME = "log.csv"
TB_DIR = "tensorboard"
CSV_FIELDS = ("epoch", "lr", "train_loss", "train_acc", "test_acc", "epoch_time")


def get_logger(run_dir: Path | None = None, enabled: bool = True, name: str = "pointclora"):
    """A logger writing to stdout and, given a run dir, to `train.log` there."""
    logger = logging.getLogger(name)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    logger.setLevel(logging.INFO if enabled else logging.ERROR)
    if enabled:
        fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
        handlers = [logging.StreamHandler(sys.stdout)]
        if run_dir is not None:
            handlers.append(logging.FileHandler(Path(run_dir) / LOG_NAME))
        for handler in handlers:
            handler.setFormatter(fmt)
            logger.addHandler(handler)
    return logger


class Recorder:
    """Per-epoch metrics to `log.csv` and TensorBoard; resumable from any epoch."""

    def __init__(self, run_dir: Path, enabled: bool = True, start_epoch: int = 0,
                 fields: tuple[str, ...] = CSV_FIELDS):
        self.enabled = enabled
        self.fields = fields  # the columns of log.csv (the test columns come from the task)
        self.rows: list[dict] = []
        self.writer = None
        if not enabled:
            return
        self.csv_path = Path(run_dir) / CSV_NAME
        if start_epoch > 0 and self.csv_path.is_file():
            with open(self.csv_path, newline="") as f:
                self.rows = [
                    {k: _number(v) for k, v in row.items()}
                    for row in csv.DictReader(f)
                    if int(row["epoch"]) < start_epoch
                ]
        self._rewrite_csv()
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops events of epochs >= start_epoch left by an earlier attempt (at 0: a
        # start that failed before its first checkpoint), so the events agree with log.csv.
        self.writer = SummaryWriter(str(Path(run_dir) / TB_DIR), purge_step=start_epoch)

    def _rewrite_csv(self) -> None:
        with open(self.csv_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.fields)
            writer.writeheader()
            writer.writerows(self.rows)

    def log_epoch(self, row: dict) -> None:
        if not self.enabled:
            return
        row = {k: row.get(k) for k in self.fields}
        self.rows.append(row)
        with open(self.csv_path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.fields).writerow(row)
        for key, value in row.items():
            if key != "epoch" and value is not None:
                self.writer.add_scalar(key, value, row["epoch"])
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _number(text: str):
    if text == "":
        return None
    return int(text) if text.lstrip("-").isdigit() else float(text)
