"""Render test samples with their predictions, the worst mistakes and the model's patches.

    python tools/visualize.py --config configs/demo.yaml --samples 16 --out vis/
    python tools/visualize.py --ckpt runs/demo/checkpoints/best.pth --out vis/ --patches

Headless by default: Open3D's OffscreenRenderer, else the legacy Visualizer under Xvfb,
else matplotlib (docs/tools.md). Without --ckpt the samples are shown without predictions.
Writes samples_NNN.png, worst_mistakes.png (with --ckpt), patches_NNN.png (--patches)
and summary.json into --out.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pointclora  # noqa: F401  (first: sets the OpenMP wait policy before torch loads)

# isort: split
import numpy as np
import torch
from torch.utils.data import Subset

from pointclora.config import (
    TRUST_PICKLE_WARNING,
    add_override_argument,
    add_trust_pickle_argument,
    checkpoint_config,
)
from pointclora.data.shapenetpart import SHAPENETPART_PARTS
from pointclora.engine import cleanup, init_distributed, load_checkpoint, predict, restore_model
from pointclora.engine.build import build_datasets, model_config, resolve_config
from pointclora.engine.metrics import part_miou, restrict_to_category
from pointclora.engine.segmentation import PartSegmentationTask
from pointclora.engine.tasks import ImageClassificationTask, build_task
from pointclora.models import build_model
from pointclora.viz import (
    BACKENDS,
    COLOR_MODES,
    GalleryStyle,
    Predictions,
    View,
    correctness_legend,
    page_legend,
    patch_legend,
    patch_tiles,
    point_colors,
    sample_tiles,
    save_page,
    select_backend,
    show_interactive,
    write_pages,
)
from pointclora.viz.images import image_tiles
from pointclora.viz.parts import part_legend, part_tiles


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="YAML config (default: the one stored in --ckpt)")
    parser.add_argument("--ckpt", help="checkpoint written by tools/train.py (predictions)")
    parser.add_argument("--out", required=True, type=Path, help="output folder for the PNGs")
    add_override_argument(parser)
    parser.add_argument("--split", choices=("test", "train"), default="test")
    parser.add_argument("--samples", type=int, default=16, help="samples shown (default 16)")
    parser.add_argument("--max-eval", type=int,
                        help="with --ckpt: samples evaluated for the mistakes page (default all)")
    parser.add_argument("--seed", type=int, default=0, help="which samples are picked")
    parser.add_argument("--color", choices=COLOR_MODES, default="correct",
                        help="colour points by correctness (green/red) or by true class")
    parser.add_argument("--patches", action="store_true",
                        help="also render the FPS patches the model sees (model.group)")
    parser.add_argument("--per-page", type=int, default=16)
    parser.add_argument("--ncols", type=int, default=4)
    parser.add_argument("--tile", type=int, default=320, help="tile size in pixels")
    parser.add_argument("--point-size", type=float,
                        help="point size in pixels (default: from the point count)")
    parser.add_argument("--up", choices=("x", "y", "z"), help="up axis (default: data.up_axis)")
    parser.add_argument("--backend", choices=("auto", *BACKENDS), default="auto",
                        help="renderer (default: first that works headless)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if available")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace PNGs/summary.json left in --out by an earlier run")
    parser.add_argument("--show", action="store_true",
                        help="also open an interactive Open3D window per sample (needs a display)")
    add_trust_pickle_argument(parser)
    args = parser.parse_args(argv)
    if not args.config and not args.ckpt:
        parser.error("give --config, --ckpt, or both")
    for name in ("samples", "per_page", "ncols", "tile", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if args.max_eval is not None and args.max_eval < 1:
        parser.error("--max-eval must be positive")
    return args


def _check_out(out: Path, overwrite: bool) -> None:
    """Refuse to replace earlier output unless asked to; never touch other files."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    ours = [p for pattern in ("samples_*.png", "patches_*.png", "worst_mistakes.png",
                              "summary.json") for p in out.glob(pattern)] if out.is_dir() else []
    if ours and not overwrite:
        raise ValueError(f"{out} already holds output of an earlier run ({ours[0].name}, ...); "
                         "pass --overwrite to replace it or choose another --out")
    for path in ours:
        path.unlink()


def _clouds(dataset, indices, transform, seed: int) -> tuple[dict, dict]:
    """{index: points (N, 3) as the model sees them}, {index: label}."""
    items = [dataset[i] for i in indices]
    batch = torch.stack([torch.as_tensor(p, dtype=torch.float32) for p, _ in items])
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        batch = transform(batch)
    clouds = {int(i): batch[k].numpy() for k, i in enumerate(indices)}
    return clouds, {int(i): int(label) for i, (_, label) in zip(indices, items, strict=True)}


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.trust_pickle:
            print(TRUST_PICKLE_WARNING, file=sys.stderr)
        ckpt = load_checkpoint(args.ckpt) if args.ckpt else None
        cfg = checkpoint_config(ckpt, args.ckpt, args.overrides, args.config)
        _check_out(args.out, args.overwrite)
        dataset = build_datasets(cfg, (args.split,))[args.split]
        cfg = resolve_config(cfg, {args.split: dataset})
        task = build_task(cfg)
        images = task.name == ImageClassificationTask.name
        if images and (args.patches or args.show):
            raise ValueError("--patches and --show draw point clouds; an image run has neither")
        transform = task.transform("test")
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(args.seed))
        shown = sorted(order[:args.samples].tolist())
        info = init_distributed(args.device)
        try:
            predictions = None
            segmentation = task.name == PartSegmentationTask.name
            if segmentation:
                written = render_parts(args, dataset, shown, cfg, ckpt, info.device)
            elif ckpt is not None:
                model, _ = restore_model(cfg, ckpt, args.trust_pickle)
                model.to(info.device).eval()
                n_eval = max(args.max_eval or len(dataset), len(shown))
                evaluated = sorted(set(order[:n_eval].tolist()) | set(shown))
                logits, labels = predict(model, Subset(dataset, evaluated), transform, info,
                                         args.batch_size, seed=cfg["train"]["seed"])
                predictions = Predictions.from_logits(evaluated, logits, labels)
            elif args.patches:
                model = build_model({**model_config(cfg), "pretrained": None}).to(info.device)
            if not segmentation:
                written = render(args, cfg, dataset, transform, shown, predictions,
                                 model if args.patches else None, info.device, images)
        finally:
            cleanup()
    except (ValueError, OSError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote {path}")
    return 0


def render(args, cfg, dataset, transform, shown, predictions, model, device,
           images: bool = False) -> list[Path]:
    """Pages of samples and of the worst mistakes; `images`: an image run (no 3D rendering,
    tiles are the images before normalisation)."""
    names = dataset.class_names
    style = GalleryStyle(color=args.color, tile=args.tile, point_size=args.point_size,
                         view=View(up=args.up or cfg["data"].get("up_axis", "y")),
                         backend=None if args.backend == "auto" else args.backend)
    backend = "images" if images else select_backend(style.backend)

    def tiles_of(indices) -> list:
        if images:
            return image_tiles(dataset, indices, names, predictions, args.tile)
        return sample_tiles(*_clouds(dataset, indices, transform, args.seed), names, style,
                            predictions)

    clouds, labels = ({}, {int(i): int(dataset.labels[i]) for i in shown}) if images else \
        _clouds(dataset, shown, transform, args.seed)
    what = f"{cfg['data']['name']} {args.split}"
    heading = f"{what}: {len(shown)} of {len(dataset)} samples"
    if predictions is not None:
        heading += (f", accuracy {predictions.accuracy:.1f}% over "
                    f"{len(predictions.index)} evaluated")
    legend = correctness_legend() if predictions is not None and args.color == "correct" else ()
    written = write_pages(tiles_of(shown), args.out, "samples", args.per_page, args.ncols,
                          heading, legend)
    summary = {"config": args.config, "ckpt": args.ckpt, "split": args.split,
               "renderer": backend, "samples": shown, "labels": [labels[i] for i in shown]}
    if predictions is not None:
        worst = predictions.worst_mistakes(args.per_page)
        summary.update(accuracy=predictions.accuracy, evaluated=len(predictions.index),
                       predictions=[predictions.lookup(i)[0] for i in shown],
                       worst_mistakes=[int(i) for i in worst])
        if len(worst):
            tiles = tiles_of(worst)
            written.append(save_page(tiles, args.out / "worst_mistakes.png", args.ncols,
                                     f"{what}: most confident mistakes",
                                     legend=page_legend(tiles, legend)))
        else:
            print(f"no mistakes among {len(predictions.index)} evaluated samples")
    if model is not None:
        points = torch.from_numpy(np.stack([clouds[i] for i in shown])).to(device)
        neighborhood, center = (t.cpu().numpy() for t in model.group(points))
        groups = {i: (neighborhood[k], center[k]) for k, i in enumerate(shown)}
        written += write_pages(patch_tiles(clouds, groups, labels, names, style), args.out,
                               "patches", args.per_page, args.ncols,
                               f"{what}: FPS centres and kNN patches", patch_legend())
    summary["files"] = [p.name for p in written]
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    written.append(args.out / "summary.json")
    if args.show:
        for i in shown:
            pred = predictions.lookup(i)[0] if predictions is not None else None
            colors = point_colors(len(clouds[i]), labels[i], pred, args.color, len(names))
            try:
                show_interactive(clouds[i], colors, title=f"#{i} {names[labels[i]]}")
            except RuntimeError as err:
                print(f"warning: {err}", file=sys.stderr)
                break
    return written


def render_parts(args, dataset, shown, cfg, ckpt, device) -> list[Path]:
    """Part segmentation: ground truth and (with --ckpt) prediction side by side, parts
    coloured by their index within the category (docs/segmentation.md)."""
    style = GalleryStyle(tile=args.tile, point_size=args.point_size,
                         view=View(up=args.up or "y"),
                         backend=None if args.backend == "auto" else args.backend)
    items = [dataset[i] for i in shown]
    points = torch.stack([item[0][:, :3] for item in items])
    category = torch.tensor([item[1] for item in items])
    target = torch.stack([item[2] for item in items])
    heading = f"{cfg['data']['name']} {args.split}: {len(shown)} of {len(dataset)} shapes"
    predictions = ious = None
    if ckpt is not None:
        model, _ = restore_model(cfg, ckpt, args.trust_pickle)
        with torch.no_grad():
            out = model.to(device).eval()(points.to(device), category.to(device)).cpu()
        pred = restrict_to_category(out, category)
        result = part_miou(pred, target, category)
        predictions = dict(zip(shown, pred.numpy(), strict=True))
        ious = dict(zip(shown, result["shape_iou"].tolist(), strict=True))
        heading += f", instance mIoU {100 * result['instance_miou']:.1f} over them"
    tiles = part_tiles(dict(zip(shown, points.numpy(), strict=True)),
                       dict(zip(shown, category.tolist(), strict=True)),
                       dict(zip(shown, target.numpy(), strict=True)), SHAPENETPART_PARTS,
                       style, predictions, ious)
    written = write_pages(tiles, args.out, "samples", 2 * args.per_page, args.ncols, heading,
                          part_legend())
    summary = {"config": args.config, "ckpt": args.ckpt, "split": args.split,
               "samples": shown, "categories": category.tolist(),
               "shape_iou": None if ious is None else [ious[i] for i in shown],
               "files": [p.name for p in written]}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    return [*written, args.out / "summary.json"]


if __name__ == "__main__":
    sys.exit(main())
