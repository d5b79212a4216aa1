"""Classify your own point-cloud files with a trained checkpoint: top-k classes.

    python tools/predict.py --ckpt runs/demo/checkpoints/best.pth chair.ply scan.pcd cloud.npy
    python tools/predict.py --ckpt CKPT points.txt --topk 3 --json

Files: .txt/.xyz/.csv (rows x y z[, ...], comma or space separated), .npy (N, >=3), .ply
and .pcd (Open3D, or a built-in reader for the uncompressed formats). Each cloud gets the
normalisation of the run's dataset and its test sampling to data.npoints, as in
tools/test.py. Class names come from the checkpoint (older checkpoints: its data config).
"""
from __future__ import annotations

import argparse
import json
import sys

from pointclora.config import (
    TRUST_PICKLE_WARNING,
    add_override_argument,
    add_trust_pickle_argument,
    checkpoint_config,
)
from pointclora.data.files import read_points
from pointclora.engine import cleanup, init_distributed, load_checkpoint, restore_model
from pointclora.engine.build import model_config
from pointclora.engine.classify import checkpoint_class_names, classify, prepare_cloud, top_k


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", required=True, help="checkpoint written by tools/train.py")
    parser.add_argument("files", nargs="+", help="point-cloud files (.txt .xyz .csv .npy .ply "
                        ".pcd)")
    parser.add_argument("--topk", type=int, default=5, help="classes shown per file (5)")
    parser.add_argument("--normalize", choices=("auto", "unit_sphere", "none"), default="auto",
                        help="auto: as the run's dataset loader did (unit sphere for "
                        "ModelNet40 and synthetic shapes, none for ScanObjectNN)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")
    add_override_argument(parser)
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if available")
    add_trust_pickle_argument(parser)
    args = parser.parse_args(argv)
    if args.topk < 1:
        parser.error(f"--topk must be a positive integer, got {args.topk}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.trust_pickle:
            print(TRUST_PICKLE_WARNING, file=sys.stderr)
        ckpt = load_checkpoint(args.ckpt)
        cfg = checkpoint_config(ckpt, args.ckpt, args.overrides)
        normalize = {"auto": None, "unit_sphere": True, "none": False}[args.normalize]
        clouds = [prepare_cloud(read_points(f), cfg["data"], f, normalize) for f in args.files]
        info = init_distributed(args.device)
        try:
            model, _ = restore_model(cfg, ckpt, args.trust_pickle)
            probs = classify(model.to(info.device), clouds, info.device)
        finally:
            cleanup()
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    names = checkpoint_class_names(ckpt, cfg, probs.shape[1])
    results = [{"file": f, "top": [{"class": c, "prob": p} for c, p in best]}
               for f, best in zip(args.files, top_k(probs, names, args.topk), strict=True)]
    if args.json:
        print(json.dumps({"ckpt": args.ckpt, "model": model_config(cfg).get("name"),
                          "results": results}, indent=2))
        return 0
    for res in results:
        print(res["file"])
        for rank, top in enumerate(res["top"], 1):
            print(f"  {rank}. {top['class']:<24} {top['prob']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
