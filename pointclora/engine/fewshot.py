"""The few-shot protocol: one run per fold, reported as mean and std over the folds."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from pointclora.config import apply_overrides
from pointclora.data.fewshot import available_folds

from .distributed import DistInfo, on_main
from .rundir import CKPT_DIR, LAST_CKPT, lock_run_dir, prepare_run_dir, release_run_dir
from .trainer import METRICS_NAME, fit

SUMMARY_NAME = "summary.json"
logger = logging.getLogger("pointclora")


def parse_folds(text: str) -> list[int]:
    """`0-9`, `0,3,5` or `2-4,7` -> sorted distinct fold numbers."""
    folds: set[int] = set()
    try:
        for part in text.split(","):
            lo, sep, hi = part.strip().partition("-")
            first, last = int(lo), int(hi) if sep else int(lo)
            if first < 0 or last < first:
                raise ValueError
            folds.update(range(first, last + 1))
    except ValueError:
        raise ValueError(
            f"--folds {text!r}: expected fold numbers like 0-9, 0,3,5 or 2-4,7") from None
    return sorted(folds)


def check_folds(cfg_data: dict, folds: list[int]) -> None:
    """Refuse, before any training, folds that the few-shot data set does not hold."""
    if cfg_data["name"] != "modelnet40_fewshot":
        raise ValueError(f"--folds needs data.name: modelnet40_fewshot; this config trains "
                         f"on {cfg_data['name']!r}")
    found = available_folds(cfg_data)
    absent = sorted(set(folds) - set(found))
    if absent:
        raise ValueError(f"--folds: fold(s) {absent} do not exist for "
                         f"{cfg_data.get('way', 5)}-way {cfg_data.get('shot', 10)}-shot "
                         f"(found {found or 'none'})")


def fold_dir(run_dir: Path, fold: int) -> Path:
    return Path(run_dir) / f"fold_{fold}"


def run_folds(cfg: dict, run_dir: str | Path, folds: list[int], info: DistInfo,
              resume: bool = False, exist_ok: bool = False, trust_pickle: bool = False) -> dict:
    """Train every fold (`data.fold`) in `run_dir/fold_K`; writes and returns the summary.

    With `resume`, finished folds are read back, an interrupted one continues from its last
    checkpoint, and the rest start fresh.
    """
    run_dir = Path(run_dir)
    check_folds(cfg["data"], folds)
    # The top folder is held too (summary.json is written there), released when done.
    if resume:
        on_main(info, lock_run_dir, run_dir)
    else:
        on_main(info, prepare_run_dir, run_dir, exist_ok=exist_ok)
    try:
        summary = _train_folds(cfg, run_dir, folds, info, resume, exist_ok, trust_pickle)
    finally:
        release_run_dir(run_dir)
    if info.is_main:
        (run_dir / SUMMARY_NAME).write_text(json.dumps(summary, indent=2) + "\n")
        logger.info("few-shot over folds %s: %.2f +- %.2f (best epoch per fold)", folds,
                    summary["best_acc_mean"], summary["best_acc_std"])
    return summary


def _train_folds(cfg: dict, run_dir: Path, folds: list[int], info: DistInfo, resume: bool,
                 exist_ok: bool, trust_pickle: bool) -> dict:
    """Each fold's run (or its finished metrics); the summary over the folds."""
    results = {}
    for fold in folds:
        out = fold_dir(run_dir, fold)
        if resume and (out / METRICS_NAME).is_file():
            results[fold] = json.loads((out / METRICS_NAME).read_text())
            logger.info("fold %d already finished: best %.2f%%", fold, results[fold]["best_acc"])
            continue
        fold_cfg = apply_overrides(cfg, [f"data.fold={fold}"])
        results[fold] = fit(fold_cfg, out, info,
                            resume=resume and (out / CKPT_DIR / LAST_CKPT).is_file(),
                            exist_ok=exist_ok, trust_pickle=trust_pickle)
    best = np.array([results[f]["best_acc"] for f in folds])
    final = np.array([results[f]["final_acc"] for f in folds])
    summary = {
        "folds": folds,
        "best_acc": best.tolist(), "best_acc_mean": float(best.mean()),
        "best_acc_std": float(best.std()),
        "final_acc": final.tolist(), "final_acc_mean": float(final.mean()),
        "final_acc_std": float(final.std()),
        "std": "population standard deviation over the folds (ddof=0)",
        "protocol": results[folds[0]]["protocol"], "method": results[folds[0]]["method"],
        "data": {k: cfg["data"].get(k) for k in ("name", "way", "shot")},
    }
    return summary
