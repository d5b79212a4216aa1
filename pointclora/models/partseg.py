"""Part segmentation on a Point-MAE / Point-BERT encoder: the official ShapeNetPart network.

``PointMAEPartSeg`` is ``segmentation/models/pt.py: get_model(50)`` of the official Point-MAE
code, key for key (27,063,730 parameters): the classification trunk without its cls token,
features after three blocks, a category embedding (``label_conv``), 3-NN feature propagation
from the patch centres to every point (``propagation_0``) and a per-point head
(``convs1..3``, ``bns1..2``). ``PointBERTPartSeg`` puts the same head on the Point-BERT
trunk (``reduce_dim`` after the mini-PointNet), as the point-cloud PEFT repositories do.
``model.name: partseg`` picks either with ``model.backbone: point_mae | point_bert``.
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from pointclora.ops import gather_points, knn

from .backbones import (
    _COUNTS,
    _SHAPES,
    WEIGHTS_HINT,
    PointBERT,
    PointMAE,
    PointTransformer,
    _check_config,
)
from .checkpoint import CheckpointSpec, Layout
from .layers import TransformerEncoder
from .pointnet import MiniPointNet, _batch_norm_relu, _pointwise
from .registry import register_backbone

SEG_HEAD = ["label_conv", "propagation_0", "convs1", "convs2", "convs3", "bns1", "bns2"]
LABEL_DIM = 64  # width of the category embedding


def default_fetch_blocks(depth: int) -> tuple[int, int, int]:
    """Blocks whose outputs feed the head: the official ``(3, 7, 11)`` for 12 blocks, the
    same thirds (ending at the last block) for other depths."""
    return tuple(max(round((k + 1) * depth / 3) - 1, 0) for k in range(3))


class FeaturePropagation(nn.Module):
    """3-NN inverse-squared-distance interpolation of centre features to every point, then
    an MLP with BN and ReLU (official ``PointNetFeaturePropagation``: ``mlp_convs``/``mlp_bns``).

    The official code concatenates ``[xyz, interpolated]`` and applies the first Conv1d to
    every point. That conv is linear, so here its feature half is applied to the ``G`` centres
    first and the result interpolated (``W sum_k w_k f_k = sum_k w_k W f_k``): the same
    function with ``G / N`` of the multiply-adds (16x fewer for 128 centres and 2048 points).
    Neighbours come from ``pointclora.ops.knn`` (k = 3, exact squared distances); the weighted
    sum is one ``embedding_bag`` call, so no ``(B, N, 3, C)`` tensor is built.
    """

    def __init__(self, in_channel: int, mlp: list[int]):
        super().__init__()
        self.mlp_convs = nn.ModuleList()
        self.mlp_bns = nn.ModuleList()
        last = in_channel
        for out in mlp:
            self.mlp_convs.append(nn.Conv1d(last, out, 1))
            self.mlp_bns.append(nn.BatchNorm1d(out))
            last = out

    @staticmethod
    def weights(points: torch.Tensor, center: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices ``(B, N, 3)`` of each point's 3 nearest centres and the normalised
        weights ``1 / (d^2 + 1e-8)`` (official)."""
        dist, idx = knn(center, points, 3)
        recip = 1.0 / (dist + 1e-8)
        return idx, recip / recip.sum(-1, keepdim=True)

    def forward(self, points: torch.Tensor, center: torch.Tensor,
                features: torch.Tensor) -> torch.Tensor:
        """``points (B, N, 3)``, ``center (B, G, 3)``, ``features (B, G, C)`` -> ``(B, N, C')``."""
        B, N, _ = points.shape
        G = center.shape[1]
        idx, weight = self.weights(points, center)
        first = self.mlp_convs[0].weight.squeeze(-1)  # (out, 3 + C): [xyz, features]
        projected = F.linear(features, first[:, 3:])  # (B, G, out)
        flat = (idx + torch.arange(B, device=idx.device).view(B, 1, 1) * G).view(B * N, 3)
        x = F.embedding_bag(flat, projected.reshape(B * G, -1),
                            per_sample_weights=weight.view(B * N, 3).to(projected.dtype),
                            mode="sum").view(B, N, -1)
        x = x + F.linear(points.to(x.dtype), first[:, :3], self.mlp_convs[0].bias)
        return self._mlp(x)

    def official_forward(self, points: torch.Tensor, center: torch.Tensor,
                         features: torch.Tensor) -> torch.Tensor:
        """The official formulation: interpolate, concatenate ``[xyz, features]``, convolve
        every point. The same function; FLOP counters count this graph (tools/flops.py)."""
        idx, weight = self.weights(points, center)
        interpolated = (gather_points(features, idx) * weight.unsqueeze(-1)).sum(2)
        x = torch.cat((points.to(interpolated.dtype), interpolated), dim=-1)
        return self._mlp(_pointwise(self.mlp_convs[0], x))

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        """From the first conv's output on: BN-ReLU, then the other conv-BN-ReLU layers."""
        x = _batch_norm_relu(self.mlp_bns[0], x)
        for conv, bn in zip(self.mlp_convs[1:], self.mlp_bns[1:], strict=True):
            x = _batch_norm_relu(bn, _pointwise(conv, x))
        return x


class PartSegmentation(nn.Module):
    """Shared by both backbones: trunk without cls token, multi-level features, seg head.

    Reuses the classification trunk's grouping, mini-PointNet, positional embedding and
    blocks (``PointTransformer.group`` / ``embed_patches``; the same modules and key names).
    """

    checkpoint: CheckpointSpec  # the files each variant reads (pointclora.models.checkpoint)
    # Read by pointclora.adapters: where low-rank methods inject, which modules are the
    # blocks, and what stays trainable besides the adapters (the whole segmentation head).
    adapter_defaults = {
        "target_modules": ["attn.qkv", "attn.proj"],
        "blocks": r"blocks\.blocks\.\d+",
        "head": list(SEG_HEAD),
        "tokens": [],  # no cls token: nothing to keep (train_tokens is off)
    }

    group = PointTransformer.group
    embed_patches = PointTransformer.embed_patches
    load_pretrained = PointTransformer.load_pretrained

    def __init__(self, num_parts: int = 50, num_categories: int = 16, num_group: int = 128,
                 group_size: int = 32, trans_dim: int = 384, depth: int = 12,
                 num_heads: int = 6, encoder_dims: int = 384, drop_path_rate: float = 0.1,
                 fetch_blocks: tuple[int, int, int] | list[int] | None = None):
        super().__init__()
        self.config = dict(num_parts=num_parts, num_categories=num_categories,
                           num_group=num_group, group_size=group_size, trans_dim=trans_dim,
                           depth=depth, num_heads=num_heads, encoder_dims=encoder_dims,
                           drop_path_rate=drop_path_rate)
        _check_config(self.config)
        if num_group < 3:
            raise ValueError(f"feature propagation interpolates from 3 centres: num_group must "
                             f"be >= 3, got {num_group}")
        fetch = default_fetch_blocks(depth) if fetch_blocks is None else tuple(fetch_blocks)
        if len(fetch) != 3 or not all(isinstance(i, int) and 0 <= i < depth for i in fetch):
            raise ValueError(f"fetch_blocks must be 3 block indices in [0, {depth}), got "
                             f"{fetch!r}")
        self.config["fetch_blocks"] = list(fetch)
        self.fetch_blocks = fetch
        self.num_parts = num_parts
        self.num_categories = num_categories
        self.num_group = num_group
        self.group_size = group_size
        self.trans_dim = trans_dim

        # trunk: the official registration order (keys encoder, [reduce_dim], pos_embed, ...)
        self.encoder = MiniPointNet(encoder_dims)
        self._add_bridge(encoder_dims, trans_dim)
        self.pos_embed = nn.Sequential(nn.Linear(3, 128), nn.GELU(), nn.Linear(128, trans_dim))
        self.blocks = TransformerEncoder(trans_dim, depth, num_heads, drop_path_rate)
        self.norm = nn.LayerNorm(trans_dim)
        # head (SEG_HEAD)
        levels = 3 * trans_dim
        self.label_conv = nn.Sequential(nn.Conv1d(num_categories, LABEL_DIM, 1, bias=False),
                                        nn.BatchNorm1d(LABEL_DIM), nn.LeakyReLU(0.2))
        self.propagation_0 = FeaturePropagation(levels + 3, [4 * trans_dim, 1024])
        self.convs1 = nn.Conv1d(1024 + 2 * levels + LABEL_DIM, 512, 1)
        self.dp1 = nn.Dropout(0.5)
        self.convs2 = nn.Conv1d(512, 256, 1)
        self.convs3 = nn.Conv1d(256, num_parts, 1)
        self.bns1 = nn.BatchNorm1d(512)
        self.bns2 = nn.BatchNorm1d(256)
        # Initialisation: PyTorch's defaults, as the official segmentation model (it never
        # applies the classifier's trunc-normal init; the trunk comes from the pretrain file).

    def _add_bridge(self, encoder_dims: int, trans_dim: int) -> None:
        raise NotImplementedError


    def one_hot(self, category: torch.Tensor, batch: int) -> torch.Tensor:
        """Category ids ``(B,)`` or one-hot ``(B, C)`` / ``(B, 1, C)`` -> float ``(B, C)``."""
        C = self.num_categories
        if not isinstance(category, torch.Tensor):
            raise TypeError(f"category must be a tensor of ids (B,) or one-hot (B, {C}), got "
                            f"{type(category).__name__}")
        if category.is_floating_point():
            if category.numel() != batch * C:
                raise ValueError(f"one-hot category must have shape ({batch}, {C}), got "
                                 f"{tuple(category.shape)}")
            return category.reshape(batch, C)
        if category.shape != (batch,):
            raise ValueError(f"category ids must have shape ({batch},), got "
                             f"{tuple(category.shape)}")
        if category.numel() and (int(category.min()) < 0 or int(category.max()) >= C):
            raise ValueError(f"category ids must lie in [0, {C}), got range "
                             f"[{int(category.min())}, {int(category.max())}]")
        return F.one_hot(category.long(), C).float()

    def forward_features(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``points (B, N, 3)`` -> centres ``(B, G, 3)`` and their features ``(B, G, 3 *
        trans_dim)``: the normalised outputs of the three ``fetch_blocks``, concatenated."""
        neighborhood, center = self.group(points)
        x = self.embed_patches(neighborhood)
        pos = self.pos_embed(center)
        levels, patches = [], pos.shape[1]
        for i, block in enumerate(self.blocks.blocks):
            x = block(x + pos)
            # prompt methods may keep prompts after the last block's patch tokens: dropped
            levels += [x[:, :patches]] * self.fetch_blocks.count(i)
        return center, torch.cat([self.norm(level) for level in levels], dim=-1)

    def forward_head(self, points: torch.Tensor, center: torch.Tensor, features: torch.Tensor,
                     one_hot: torch.Tensor, official: bool = False) -> torch.Tensor:
        """Per-point log-probabilities ``(B, N, num_parts)``.

        The official ``convs1`` sees ``[propagated (1024), max, mean, label]`` at every point;
        the last three are the same for all points of a shape, so their share of the product
        is computed once per shape and broadcast (same function, a third of the work).
        ``official=True`` concatenates as the official code does (what FLOP counters count).
        """
        label = self.label_conv(one_hot.unsqueeze(-1)).squeeze(-1)  # (B, 64)
        shape_feature = torch.cat((features.amax(1), features.mean(1), label), dim=-1)
        x = self.propagation_0(points, center, features)  # (B, N, 1024)
        if official:
            shape_feature = shape_feature.unsqueeze(1).expand(-1, x.shape[1], -1)
            x = _pointwise(self.convs1, torch.cat((x, shape_feature), dim=-1))
        else:
            w = self.convs1.weight.squeeze(-1)
            local = x.shape[-1]
            x = F.linear(x, w[:, :local]) + F.linear(shape_feature, w[:, local:],
                                                     self.convs1.bias).unsqueeze(1)
        x = self.dp1(_batch_norm_relu(self.bns1, x))
        x = _batch_norm_relu(self.bns2, _pointwise(self.convs2, x))
        return F.log_softmax(_pointwise(self.convs3, x), dim=-1)

    def example_inputs(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(points, category 0)``: the inputs FLOP counters trace (tools/flops.py)."""
        return points, torch.zeros(points.shape[0], dtype=torch.long, device=points.device)

    def forward(self, points: torch.Tensor, category: torch.Tensor) -> torch.Tensor:
        """``points (B, N, 3)``, ``category`` ids ``(B,)`` or one-hot ``(B, num_categories)``
        -> log-probabilities ``(B, N, num_parts)``."""
        return self._forward(points, category, official=False)

    def official_forward(self, points: torch.Tensor, category: torch.Tensor) -> torch.Tensor:
        """``forward`` with the head computed as the official graph (see ``forward_head``):
        the same function; FLOP counters count this graph (tools/flops.py)."""
        return self._forward(points, category, official=True)

    def _forward(self, points: torch.Tensor, category: torch.Tensor,
                 official: bool) -> torch.Tensor:
        one_hot = self.one_hot(category, points.shape[0]).to(points.dtype)
        center, features = self.forward_features(points)
        return self.forward_head(points, center, features, one_hot, official)


def _spec(backbone: type[PointTransformer], marks: tuple[str, ...]) -> CheckpointSpec:
    """The backbone's pre-training layout (its cls tokens, which the segmentation model does
    not have, ignored) plus fine-tuned segmentation files (``propagation_0`` keys)."""
    base = backbone.checkpoint
    pretrain = base.layouts[0]
    pretrain = replace(pretrain, dropped=(*pretrain.dropped, "cls_token", "cls_pos"), fresh=())
    return CheckpointSpec(
        title=base.title,
        layouts=(pretrain, Layout("fine-tuned part-segmentation checkpoint", marks=marks)),
        head=tuple(SEG_HEAD), classes=("num_parts", "convs3.weight"),
        shapes=_SHAPES, counts=_COUNTS, weights_hint=WEIGHTS_HINT,
    )


@register_backbone("point_mae_partseg")
class PointMAEPartSeg(PartSegmentation):
    """Official Point-MAE ShapeNetPart model (``segmentation/models/pt.py: get_model``)."""

    checkpoint = _spec(PointMAE, ("blocks.blocks.", "propagation_0."))
    _add_bridge = PointMAE._add_bridge  # the same trunk: no reduce_dim


@register_backbone("point_bert_partseg")
class PointBERTPartSeg(PartSegmentation):
    """The same segmentation head on the Point-BERT trunk (mini-PointNet 256 + ``reduce_dim``).

    Not in the official Point-BERT code (which has no segmentation model); the layout the
    point-cloud PEFT repositories use: trunk keys as ``PointBERT``, head keys as
    ``PointMAEPartSeg``, no cls token.
    """

    checkpoint = _spec(PointBERT, ("blocks.blocks.", "reduce_dim.", "propagation_0."))

    def __init__(self, num_parts: int = 50, num_categories: int = 16, num_group: int = 128,
                 group_size: int = 32, trans_dim: int = 384, depth: int = 12,
                 num_heads: int = 6, encoder_dims: int = 256, drop_path_rate: float = 0.1,
                 fetch_blocks: tuple[int, int, int] | list[int] | None = None):
        super().__init__(num_parts=num_parts, num_categories=num_categories,
                         num_group=num_group, group_size=group_size, trans_dim=trans_dim,
                         depth=depth, num_heads=num_heads, encoder_dims=encoder_dims,
                         drop_path_rate=drop_path_rate, fetch_blocks=fetch_blocks)

    _add_bridge = PointBERT._add_bridge  # reduce_dim after the mini-PointNet

    def embed_patches(self, neighborhood: torch.Tensor) -> torch.Tensor:
        return self.reduce_dim(super().embed_patches(neighborhood))



PARTSEG_BACKBONES = {"point_mae": PointMAEPartSeg, "point_bert": PointBERTPartSeg}


@register_backbone("partseg")
def build_partseg(backbone: str = "point_mae", num_parts: int = 50, num_categories: int = 16,
                  num_group: int = 128, group_size: int = 32, trans_dim: int = 384,
                  depth: int = 12, num_heads: int = 6, encoder_dims: int | None = None,
                  drop_path_rate: float = 0.1,
                  fetch_blocks: tuple[int, int, int] | list[int] | None = None
                  ) -> PartSegmentation:
    """The segmentation model on the ``backbone`` encoder (``point_mae``: ``PointMAEPartSeg``,
    ``point_bert``: ``PointBERTPartSeg``), the classes of ``point_mae_partseg`` /
    ``point_bert_partseg``. ``encoder_dims`` null: the encoder's own width, ``trans_dim`` for
    Point-MAE (it has no ``reduce_dim``), the official 256 for Point-BERT."""
    if backbone not in PARTSEG_BACKBONES:
        raise ValueError(f"model.backbone must be one of {sorted(PARTSEG_BACKBONES)} for the "
                         f"part-segmentation model; got {backbone!r}")
    options = dict(num_parts=num_parts, num_categories=num_categories, num_group=num_group,
                   group_size=group_size, trans_dim=trans_dim, depth=depth,
                   num_heads=num_heads, drop_path_rate=drop_path_rate,
                   fetch_blocks=fetch_blocks)
    if encoder_dims is None and backbone == "point_mae":
        encoder_dims = trans_dim
    if encoder_dims is not None:
        options["encoder_dims"] = encoder_dims
    return PARTSEG_BACKBONES[backbone](**options)
