"""Prepare datasets: ModelNet40 FPS caches, few-shot folds, synthetic data in official layouts.

  python tools/prepare_data.py modelnet40 datasets/modelnet40_normal_resampled
  python tools/prepare_data.py modelnet40_fewshot datasets/modelnet40_normal_resampled \\
      --out datasets/ModelNetFewshot
  python tools/prepare_data.py synthetic datasets/synthetic_modelnet --layout modelnet40
  python tools/prepare_data.py synthetic_parts datasets/synthetic_shapenetpart

Files are written atomically and never replace existing ones without --force.
See datasets/README.md for the layouts.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pointclora.data import DataError
from pointclora.data import fewshot as fs
from pointclora.data import modelnet40 as mn
from pointclora.data import synthetic as syn
from pointclora.data import synthetic_parts as parts


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.split("\n")[1:]))
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("modelnet40", help="build the official FPS caches from the txt files")
    m.add_argument("root", type=Path, help="modelnet40_normal_resampled folder")
    m.add_argument("--out", type=Path, help="where to write the caches (default: ROOT)")
    m.add_argument("--splits", nargs="+", default=["train", "test"], choices=["train", "test"])
    m.add_argument("--points", type=int, default=8192, help="points per shape (official 8192)")
    m.add_argument("--num-category", type=int, default=40, choices=[10, 40])
    m.add_argument("--batch-size", type=int, default=16, help="shapes per FPS call")
    m.add_argument("--device", default="cpu", help="device for FPS, e.g. cuda")
    m.add_argument("--force", action="store_true", help="replace existing caches")
    m.add_argument("--quiet", action="store_true", help="no progress bar")

    f = sub.add_parser("modelnet40_fewshot", help="write {way}way_{shot}shot/{fold}.pkl folds")
    f.add_argument("root", type=Path, help="ModelNet40 folder (FPS caches or txt files)")
    f.add_argument("--out", type=Path, required=True, help="few-shot root to write")
    f.add_argument("--way", type=int, nargs="+", default=[5, 10])
    f.add_argument("--shot", type=int, nargs="+", default=[10, 20])
    f.add_argument("--folds", type=int, default=10)
    f.add_argument("--query", type=int, default=20, help="test shapes per class")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--points", type=int, default=8192)
    f.add_argument("--cache-dir", type=Path, help="where the FPS caches are (default: ROOT)")
    f.add_argument("--force", action="store_true")

    s = sub.add_parser("synthetic", help="write synthetic shapes in an official layout")
    s.add_argument("out", type=Path)
    s.add_argument("--layout", choices=["modelnet40", "scanobjectnn"], default="modelnet40")
    s.add_argument("--variant", choices=sorted(syn.VARIANTS), default="pb_t50_rs",
                   help="ScanObjectNN variant (layout scanobjectnn)")
    s.add_argument("--num-classes", type=int, default=8)
    s.add_argument("--samples-per-class", type=int, default=20, help="per split")
    s.add_argument("--npoints", type=int, help="default 10000 (modelnet40) / 2048 (scanobjectnn)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--noise", type=float, default=0.01)
    s.add_argument("--occlusion", type=float,
                   help="max occluded fraction (default 0; 0.3 for pb_t50_rs)")
    s.add_argument("--rotation", choices=syn.ROTATIONS, default="up")
    s.add_argument("--force", action="store_true")

    sp = sub.add_parser("synthetic_parts", help="write synthetic part shapes in the official "
                        "ShapeNetPart layout")
    sp.add_argument("out", type=Path)
    sp.add_argument("--samples-per-category", type=int, default=4,
                    help="shapes per category in each of train, val and test")
    sp.add_argument("--num-categories", type=int, default=16)
    sp.add_argument("--npoints", type=int, default=2500)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--force", action="store_true")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "modelnet40":
            for split in args.splits:
                r = mn.build_cache(args.root, split, args.out, args.points, args.num_category,
                                   args.batch_size, args.device, args.force, not args.quiet)
                print(f"wrote {r['path']}: {r['shapes']} shapes in {r['seconds']:.1f} s "
                      f"(parse {r['parse_s']:.1f} s, FPS {r['fps_s']:.1f} s)")
        elif args.command == "modelnet40_fewshot":
            paths = fs.make_folds(args.root, args.out, args.way, args.shot, args.folds,
                                  args.query, args.seed, args.points, args.cache_dir, args.force)
            print(f"wrote {len(paths)} folds under {args.out}")
        elif args.command == "synthetic_parts":
            parts.write_shapenetpart_layout(args.out, args.samples_per_category, args.npoints,
                                            args.seed, args.num_categories, args.force)
            print(f"wrote synthetic ShapeNetPart data to {args.out}")
        else:
            options = dict(num_classes=args.num_classes, samples_per_class=args.samples_per_class,
                           seed=args.seed, noise=args.noise, rotation=args.rotation,
                           force=args.force)
            if args.occlusion is not None:
                options["occlusion"] = args.occlusion
            if args.layout == "modelnet40":
                syn.write_modelnet40_layout(args.out, npoints=args.npoints or 10000, **options)
            else:
                syn.write_scanobjectnn_layout(args.out, args.variant,
                                              npoints=args.npoints or 2048, **options)
            print(f"wrote synthetic {args.layout} data to {args.out}")
    except (DataError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
