"""Evaluate a training checkpoint on the test split, optionally with multi-view voting.

    python tools/test.py --ckpt runs/modelnet40_1k/checkpoints/best.pth --vote 10
    python tools/test.py --ckpt CKPT --vote 10 --vote-repeats 300   # official: best of 300
    python tools/test.py --ckpt CKPT --confusion confusion.png
    python tools/test.py --config configs/modelnet40/1k.yaml --ckpt CKPT --set data.root=...

Without --config the run's own config (stored in the checkpoint) is used.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from pointclora.config import (
    TRUST_PICKLE_WARNING,
    add_override_argument,
    add_trust_pickle_argument,
    checkpoint_config,
)
from pointclora.engine import cleanup, init_distributed, load_checkpoint
from pointclora.engine.evaluate import evaluate_checkpoint
from pointclora.engine.rundir import check_output_file
from pointclora.engine.tasks import TASKS

JSON_MARK = "tools/test.py"  # `written_by` of the result files this tool may replace


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", required=True, help="checkpoint written by tools/train.py")
    parser.add_argument("--config", help="YAML config (default: the one stored in --ckpt)")
    add_override_argument(parser)
    parser.add_argument("--vote", type=int, default=1, metavar="N",
                        help="views per shape, logits averaged (ModelNet40 protocol: 10)")
    parser.add_argument("--vote-repeats", type=int, default=1, metavar="R",
                        help="repeat the voted evaluation R times (seeds seed..seed+R-1) and "
                        "report the best, as the official test_vote does (300); this selects "
                        "on the test set and is reported as 'best of R repeats'")
    parser.add_argument("--confusion", metavar="PNG",
                        help="write the confusion matrix figure here (classification)")
    parser.add_argument("--batch-size", type=int, help="default: train.batch_size")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if available")
    parser.add_argument("--json", help="also write the result to this JSON file (an existing "
                        "file is replaced only if this tool wrote it)")
    add_trust_pickle_argument(parser)
    args = parser.parse_args(argv)
    for name in ("vote", "vote_repeats", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    return args


def _own_result(path: Path) -> bool:
    """Whether `path` is a result file written by this tool (and so may be replaced)."""
    try:
        return json.loads(path.read_text()).get("written_by") == JSON_MARK
    except (ValueError, UnicodeDecodeError, AttributeError, OSError):
        return False


def report(result: dict, ckpt: dict) -> str:
    """The printed result: headline metrics, how they were obtained, per-class tables."""
    saved = ckpt.get("metrics") or {}
    task = TASKS[result["task"]]()
    lines = [f"test {result['summary']}; voting: {result['voting']}; {result['samples']} "
             f"samples, checkpoint epoch {result['epoch']}"]
    if task.best_metric in saved:  # in the task's own words (its metric names)
        lines[0] += f"; at save time {task.summary(saved)} without voting"
    stats = result.get("repeat_stats")
    if stats:
        lines.append(f"over the {result['repeats']} repeats: {stats['metric']} mean "
                     f"{stats['mean']:.2f} std {stats['std']:.2f} (min {stats['min']:.2f}, "
                     f"max {stats['max']:.2f})")
    lines.append(f"protocol: {result['protocol']}")
    for key, table in result.items():  # the task's per-class tables (dicts of rows)
        if isinstance(table, dict) and table and all(isinstance(r, dict) for r in
                                                     table.values()):
            columns = list(next(iter(table.values())))
            lines.append(f"{key:<24}" + "".join(f"{c:>12}" for c in columns))
            lines += [f"{name:<24}" + "".join(f"{_cell(row.get(c)):>12}" for c in columns)
                      for name, row in table.items()]
    return "\n".join(lines)


def _cell(value) -> str:
    if value is None:
        return "-"
    return format(value, ".2f") if isinstance(value, float) else str(value)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.json:  # before the evaluation, which may take long
            check_output_file(args.json, _own_result, "--json", "it is not a result file "
                              "written by tools/test.py; choose another path")
        if args.trust_pickle:
            print(TRUST_PICKLE_WARNING, file=sys.stderr)
        ckpt = load_checkpoint(args.ckpt)
        cfg = checkpoint_config(ckpt, args.ckpt, args.overrides, args.config)
        info = init_distributed(args.device)
        try:
            result = evaluate_checkpoint(cfg, ckpt, info, views=args.vote,
                                         batch_size=args.batch_size,
                                         repeats=args.vote_repeats,
                                         trust_pickle=args.trust_pickle)
        finally:
            cleanup()
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if info.is_main:
        print(report(result, ckpt))
        if args.confusion:
            if "confusion" not in result:
                print(f"error: --confusion: the {result['task']} task has no confusion matrix",
                      file=sys.stderr)
                return 2
            from pointclora.engine.plots import plot_confusion

            matrix = result["confusion"]
            plot_confusion(np.array(matrix["counts"]), matrix["classes"], Path(args.confusion),
                           title=f"test split, epoch {result['epoch']} ({result['summary']})")
            print(f"confusion matrix: {args.confusion}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({**result, "ckpt": args.ckpt, "written_by": JSON_MARK}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
