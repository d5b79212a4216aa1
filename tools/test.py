"""Evaluate a training checkpoint on the test split, optionally with multi-view voting.

    python tools/test.py --ckpt runs/modelnet40_1k/checkpoints/best.pth --vote 10
    python tools/test.py --config configs/modelnet40/1k.yaml --ckpt CKPT --set data.root=...

Without --config the run's own config (stored in the checkpoint) is used.
"""
from __future__ import annotations

import argparse
import json
import sys

from pointclora.config import add_override_argument, apply_overrides, load_config, validate
from pointclora.engine import cleanup, init_distributed, load_checkpoint
from pointclora.engine.evaluate import evaluate_checkpoint


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", required=True, help="checkpoint written by tools/train.py")
    parser.add_argument("--config", help="YAML config (default: the one stored in --ckpt)")
    add_override_argument(parser)
    parser.add_argument("--vote", type=int, default=1, metavar="N",
                        help="views per shape, logits averaged (ModelNet40 protocol: 10)")
    parser.add_argument("--batch-size", type=int, help="default: train.batch_size")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if available")
    parser.add_argument("--json", help="also write the result to this JSON file")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        ckpt = load_checkpoint(args.ckpt)
        if args.config:
            cfg = load_config(args.config, args.overrides)
        else:
            cfg = validate(apply_overrides(ckpt["config"], args.overrides), args.ckpt)
        info = init_distributed(args.device)
        try:
            result = evaluate_checkpoint(cfg, ckpt, info, views=args.vote,
                                         batch_size=args.batch_size)
        finally:
            cleanup()
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if info.is_main:
        saved = (ckpt.get("metrics") or {}).get("acc")
        print(f"test accuracy {result['acc']:.2f}% ({result['views']} view(s), "
              f"{result['samples']} shapes, checkpoint epoch {result['epoch']})"
              + (f"; at save time {saved:.2f}% without voting" if saved is not None else ""))
        print(f"protocol: {result['protocol']}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({**result, "ckpt": args.ckpt}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
