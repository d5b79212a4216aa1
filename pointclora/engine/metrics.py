"""Part-segmentation metrics as the official ShapeNetPart test loop computes them."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from pointclora.data.shapenetpart import SHAPENETPART_PARTS


def part_mask(parts: Mapping[str, Sequence[int]], num_parts: int) -> torch.Tensor:
    """``(C, num_parts)`` bool: which part labels belong to each category."""
    mask = torch.zeros(len(parts), num_parts, dtype=torch.bool)
    for c, labels in enumerate(parts.values()):
        mask[c, list(labels)] = True
    return mask


def restrict_to_category(logits: torch.Tensor, category: torch.Tensor,
                         parts: Mapping[str, Sequence[int]] = SHAPENETPART_PARTS
                         ) -> torch.Tensor:
    """Per-point labels ``(S, N)``: the argmax over the shape's own category's parts only."""
    mask = part_mask(parts, logits.shape[-1]).to(logits.device)[category]  # (S, P)
    return logits.masked_fill(~mask.unsqueeze(1), float("-inf")).argmax(-1)


def part_miou(pred: torch.Tensor, target: torch.Tensor, category: torch.Tensor,
              parts: Mapping[str, Sequence[int]] = SHAPENETPART_PARTS) -> dict:
    """Instance and class mIoU of part predictions, exactly as the official test loop.

    ``pred``: logits or log-probabilities ``(S, N, P)`` (restricted to the category's parts
    before the argmax) or labels ``(S, N)``; ``target`` ``(S, N)``; ``category`` ``(S,)`` indices
    into ``parts`` (category -> its part labels). Per shape, the IoU of each part of its
    category, 1.0 for a part absent from both prediction and ground truth; shape IoU = their
    mean. Returns fractions in [0, 1]: ``instance_miou`` (mean over shapes), ``class_miou``
    (mean over the categories present of their mean shape IoU; the official loop gives NaN
    when a category has no test shape), ``per_category`` ({name: IoU or None if absent}) and
    ``shape_iou`` ``(S,)``.
    """
    category = torch.as_tensor(category).long().cpu()
    target = torch.as_tensor(target).long().cpu()
    pred = torch.as_tensor(pred).cpu()
    if pred.dim() == 3:
        pred = restrict_to_category(pred, category, parts)
    if pred.shape != target.shape or target.dim() != 2 or category.shape != target.shape[:1]:
        raise ValueError(f"pred {tuple(pred.shape)}, target {tuple(target.shape)} and category "
                         f"{tuple(category.shape)} must be (S, N) [or (S, N, P) logits], (S, N) "
                         "and (S,)")
    names = list(parts)
    num_parts = 1 + max(max(v) for v in parts.values())
    mask = part_mask(parts, num_parts)[category]  # (S, P)
    S = len(target)
    row = torch.arange(S).unsqueeze(1) * num_parts

    def counts(labels: torch.Tensor) -> torch.Tensor:
        return torch.bincount((row + labels).flatten(), minlength=S * num_parts).view(S, -1)

    for what, labels in (("pred", pred), ("target", target)):
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_parts):
            raise ValueError(f"{what} labels must lie in [0, {num_parts}); got range "
                             f"[{int(labels.min())}, {int(labels.max())}]")
    same = pred == target
    inter = torch.bincount((row + target)[same], minlength=S * num_parts).view(S, -1)
    union = counts(pred) + counts(target) - inter
    iou = torch.where(union == 0, 1.0, inter.double() / union.clamp_min(1).double())
    shape_iou = (iou * mask).sum(1) / mask.sum(1)
    per_category = {}
    for c, name in enumerate(names):
        member = category == c
        per_category[name] = float(shape_iou[member].mean()) if member.any() else None
    present = [v for v in per_category.values() if v is not None]
    return {"instance_miou": float(shape_iou.mean()),
            "class_miou": float(sum(present) / len(present)),
            "per_category": per_category, "shape_iou": shape_iou}
