"""Part segmentation as an engine task: per-point NLL loss, the official instance / class mIoU."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from pointclora.data.shapenetpart import (
    PART_DATASETS,
    SHAPENETPART_PARTS,
    build_part_augment,
    part_protocol,
)

from .metrics import part_miou, restrict_to_category
from .tasks import Task, register_task


@register_task
class PartSegmentationTask(Task):
    """Batches ``(points (B, N, 3+), category (B,), parts (B, N))``; the model is called as
    ``model(xyz, category)`` and returns log-probabilities ``(B, N, num_parts)``.

    Loss: NLL over every point (the official ``get_loss``). Test metrics, in percent:
    ``ins_miou`` (picks the best epoch, as the official run saved ``best_model.pth`` on it),
    ``cls_miou``, point accuracy ``acc``, and the per-category mIoU. Predictions are
    restricted to the shape's category's parts before the argmax (official test loop).
    """

    name = "part_segmentation"
    datasets = PART_DATASETS
    log_metrics = ("ins_miou", "cls_miou", "acc")
    best_metric = "ins_miou"

    def derive(self, datasets: dict) -> dict:
        """``model.num_categories`` from the data when null (16 for ShapeNetPart)."""
        found = next(iter(datasets.values())).num_classes
        given = self.cfg["model"].get("num_categories")
        if given is None:
            return {"model": {"num_categories": found}}
        if given < found:
            raise ValueError(f"model.num_categories is {given} but the dataset "
                             f"{self.cfg['data']['name']!r} has {found} categories; set "
                             f"model.num_categories={found} (or null to follow the data)")
        return {}

    def random_backbone_outcome(self) -> str:
        return "part mIoU far below published numbers"

    def transform(self, mode: str) -> Callable:
        return build_part_augment(self.cfg["data"], mode)

    def protocol(self) -> str:
        return part_protocol(self.cfg["data"])

    def prepare(self, batch, device, transform):
        points, category, parts = batch
        points = transform(points.to(device, non_blocking=True))[..., :3].contiguous()
        category = torch.as_tensor(category).to(device, non_blocking=True)
        return (points, category), parts.to(device, non_blocking=True)

    def loss(self, output, target):
        return F.nll_loss(output.float().reshape(-1, output.shape[-1]), target.reshape(-1))

    def train_counts(self, output, target):
        return (output.argmax(-1) == target).sum().item(), target.numel()

    def records(self, output, target, inputs):
        category = inputs[1]
        pred = restrict_to_category(output.float(), category, self._parts(output.shape[-1]))
        return {"pred": pred.to(torch.uint8).cpu(), "target": target.to(torch.uint8).cpu(),
                "category": category.cpu()}

    def metrics(self, records, class_names):
        pred, target = records["pred"].long(), records["target"].long()
        result = part_miou(pred, target, records["category"], self._parts())
        names = list(SHAPENETPART_PARTS)
        counts = torch.bincount(records["category"], minlength=len(names)).tolist()
        return {"ins_miou": 100 * result["instance_miou"], "cls_miou": 100 * result["class_miou"],
                "acc": 100 * (pred == target).double().mean().item(),
                "per_category_miou": {name: None if v is None else 100 * v
                                      for name, v in result["per_category"].items()},
                "shapes": dict(zip(names, counts, strict=True))}

    def details(self, metrics, class_names):
        return {"per_category_miou": {
            name: {"miou": miou, "shapes": metrics["shapes"][name]}
            for name, miou in metrics["per_category_miou"].items() if miou is not None}}

    def summary(self, metrics):
        return (f"instance mIoU {metrics['ins_miou']:.2f}% (class mIoU "
                f"{metrics['cls_miou']:.2f}%, point accuracy {metrics['acc']:.2f}%)")

    def figures(self, metrics, class_names, run_dir, title):
        """``per_category.png``: the mIoU of every category with test shapes."""
        from .plots import _pyplot

        scores = {k: v for k, v in metrics["per_category_miou"].items() if v is not None}
        plt = _pyplot()
        fig, ax = plt.subplots(figsize=(max(4.0, 0.55 * len(scores) + 1.5), 3.8))
        bars = ax.bar(list(scores), list(scores.values()), color="#4c72b0")
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
        ax.axhline(metrics["cls_miou"], color="k", lw=0.8, ls="--", label="class mIoU")
        ax.set(ylim=(0, 105), ylabel="mIoU (%)", title=title)
        ax.tick_params(axis="x", rotation=45)
        ax.legend(loc="lower right")
        fig.tight_layout()
        fig.savefig(Path(run_dir) / "per_category.png", dpi=110)
        plt.close(fig)

    @staticmethod
    def _parts(num_parts: int = 50) -> dict[str, Sequence[int]]:
        if num_parts != 50:
            raise ValueError(f"the ShapeNetPart metric needs the 50-part output; the model has "
                             f"{num_parts} (set model.num_parts: 50)")
        return SHAPENETPART_PARTS
