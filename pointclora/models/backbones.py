"""Point-MAE and Point-BERT fine-tuning backbones, key for key the official networks."""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from pointclora.ops import furthest_point_sample, gather_points, knn

from .checkpoint import CheckpointSpec, Layout, LoadReport, load_pretrained
from .layers import TransformerEncoder
from .pointnet import MiniPointNet
from .registry import register_backbone

HEAD_PREFIX = "cls_head_finetune"
# Where users get the files; quoted in error messages.
WEIGHTS_HINT = (
    "the official weights of the Point-MAE and Point-BERT projects are linked from their GitHub "
    "pages (Point-MAE's releases: pretrain.pth and fine-tuned files; Point-BERT's 'Pretrained "
    "Models' table: Point-BERT.pth and fine-tuned files)"
)
# Config values a file pins down by its shapes, named in errors ("The file implies depth=12").
_SHAPES = {"trans_dim": "norm.weight", "encoder_dims": "encoder.second_conv.3.weight"}
_COUNTS = {"depth": r"blocks\.blocks\.(\d+)\."}


def _init_weights(module: nn.Module) -> None:
    """The official initialisation: truncated normal (std 0.02) weights, zero biases."""
    if isinstance(module, (nn.Linear, nn.Conv1d)):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def _check_config(config: dict) -> None:
    for name, value in config.items():
        if name == "drop_path_rate":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                    0 <= value < 1):
                raise ValueError(f"drop_path_rate must be a number in [0, 1), got {value!r}")
        elif isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if config["trans_dim"] % config["num_heads"]:
        raise ValueError(f"trans_dim={config['trans_dim']} must be divisible by "
                         f"num_heads={config['num_heads']}")


class PointTransformer(nn.Module):
    """The trunk shared by both backbones (the official fine-tune ``PointTransformer``).

    Points are grouped into ``num_group`` patches of ``group_size`` neighbours (FPS centres,
    kNN), each patch becomes a token through the mini-PointNet, a cls token is prepended and
    ``depth`` pre-norm blocks run with the positional embedding added before every block.
    The head sees ``concat(cls token, max over patch tokens)``.
    """

    checkpoint: CheckpointSpec  # the files each backbone reads (pointclora.models.checkpoint)
    # Read by pointclora.adapters (which knows no model names): where low-rank methods inject
    # by default, which modules are the transformer blocks (prompt methods), and what stays
    # trainable besides the adapters: the task head, and the learned tokens.
    adapter_defaults = {
        "target_modules": ["attn.qkv", "attn.proj"],
        "blocks": r"blocks\.blocks\.\d+",
        "head": [HEAD_PREFIX],
        "tokens": ["cls_token", "cls_pos"],
    }

    def __init__(self, cls_dim: int = 40, num_group: int = 64, group_size: int = 32,
                 trans_dim: int = 384, depth: int = 12, num_heads: int = 6,
                 encoder_dims: int = 384, drop_path_rate: float = 0.1):
        super().__init__()
        self.config = dict(cls_dim=cls_dim, num_group=num_group, group_size=group_size,
                           trans_dim=trans_dim, depth=depth, num_heads=num_heads,
                           encoder_dims=encoder_dims, drop_path_rate=drop_path_rate)
        _check_config(self.config)
        self.cls_dim = cls_dim
        self.num_group = num_group
        self.group_size = group_size
        self.trans_dim = trans_dim

        self.encoder = MiniPointNet(encoder_dims)
        self._add_bridge(encoder_dims, trans_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, trans_dim))
        self.cls_pos = nn.Parameter(torch.zeros(1, 1, trans_dim))
        self.pos_embed = nn.Sequential(nn.Linear(3, 128), nn.GELU(), nn.Linear(128, trans_dim))
        self.blocks = TransformerEncoder(trans_dim, depth, num_heads, drop_path_rate)
        self.norm = nn.LayerNorm(trans_dim)
        self.cls_head_finetune = self._make_head(2 * trans_dim, cls_dim)  # HEAD_PREFIX

        self.apply(_init_weights)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.cls_pos, std=0.02)

    def _add_bridge(self, encoder_dims: int, trans_dim: int) -> None:
        """Register the layer between the mini-PointNet and the transformer, if any."""
        raise NotImplementedError

    def _make_head(self, in_dim: int, cls_dim: int) -> nn.Sequential:
        raise NotImplementedError

    @torch.no_grad()
    def group(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``points (B, N, 3)`` -> centred ``neighborhood (B, G, S, 3)``, ``center (B, G, 3)``.

        Centres are FPS samples of the input; each patch holds the ``group_size`` nearest
        points of its centre (the centre first), minus the centre. Indices carry no gradient,
        so grouping always runs without autograd.
        """
        if points.dim() != 3 or points.shape[-1] != 3 or not points.is_floating_point():
            raise ValueError(f"points must be a float tensor of shape (B, N, 3) (xyz only), got "
                             f"{points.dtype} {tuple(points.shape)}")
        if points.shape[1] < max(self.num_group, self.group_size):
            raise ValueError(f"{points.shape[1]} points per cloud is fewer than num_group="
                             f"{self.num_group} or group_size={self.group_size}")
        center = gather_points(points, furthest_point_sample(points, self.num_group))
        _, idx = knn(points, center, self.group_size)
        return gather_points(points, idx) - center.unsqueeze(2), center

    def embed_patches(self, neighborhood: torch.Tensor) -> torch.Tensor:
        """Patch tokens ``(B, G, trans_dim)``; the mini-PointNet runs without autograd when
        none of its parameters is trained (a frozen encoder needs no graph)."""
        frozen = not any(p.requires_grad for p in self.encoder.parameters())
        with torch.no_grad() if frozen else contextlib.nullcontext():
            return self.encoder(neighborhood)

    def forward_features(self, points: torch.Tensor) -> torch.Tensor:
        """Normalised tokens ``(B, 1 + G, trans_dim)``, the cls token first."""
        neighborhood, center = self.group(points)
        tokens = self.embed_patches(neighborhood)
        B = tokens.shape[0]
        x = torch.cat((self.cls_token.expand(B, -1, -1), tokens), dim=1)
        pos = torch.cat((self.cls_pos.expand(B, -1, -1), self.pos_embed(center)), dim=1)
        return self.norm(self.blocks(x, pos))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, cls_dim)`` from the tokens: head on ``concat(cls, max over patches)``."""
        return self.cls_head_finetune(torch.cat((x[:, 0], x[:, 1:].amax(dim=1)), dim=-1))

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        """``points (B, N, 3)`` -> logits ``(B, cls_dim)``."""
        return self.forward_head(self.forward_features(points))

    def load_pretrained(self, path: str | Path, strict: bool = True,
                        trust_pickle: bool = False) -> LoadReport:
        """Load an official pre-trained or fine-tuned checkpoint and report what was loaded.

        Reads ``pretrain.pth`` (Point-MAE), ``Point-BERT.pth`` and the official fine-tuned
        files, in any of their containers, with or without the ``module.`` prefix. Keys a
        layout does not carry by design (the head; Point-MAE's cls tokens) keep their init;
        a head trained for another ``cls_dim`` is skipped with a note. Any other mismatch
        raises :class:`~pointclora.models.CheckpointError`; ``strict=False`` only lets missing
        and unexpected keys through (reported), never shape mismatches or the wrong backbone.
        Load before injecting adapters: the file matches the plain backbone's keys.
        A file that pickles more than tensors is refused unless ``trust_pickle=True``.
        """
        return load_pretrained(self, path, strict=strict, trust_pickle=trust_pickle)


@register_backbone("point_mae")
class PointMAE(PointTransformer):
    """Point-MAE fine-tuning backbone (``models/Point_MAE.py: PointTransformer``)."""

    checkpoint = CheckpointSpec(
        title="Point-MAE",
        layouts=(
            # pretrain.pth: the encoder under MAE_encoder.; no cls tokens (they start fresh).
            Layout("Point-MAE pre-training checkpoint", marks=("MAE_encoder.",),
                   prefix="MAE_encoder.", fresh=("cls_token", "cls_pos")),
            Layout("fine-tuned checkpoint", marks=("blocks.blocks.",)),
        ),
        head=(HEAD_PREFIX,), classes=("cls_dim", f"{HEAD_PREFIX}.8.weight"),
        shapes=_SHAPES, counts=_COUNTS, weights_hint=WEIGHTS_HINT,
    )

    def _add_bridge(self, encoder_dims: int, trans_dim: int) -> None:
        if encoder_dims != trans_dim:
            raise ValueError(f"Point-MAE feeds the mini-PointNet output straight into the "
                             f"transformer: encoder_dims ({encoder_dims}) must equal trans_dim "
                             f"({trans_dim})")

    def _make_head(self, in_dim: int, cls_dim: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Linear(in_dim, 256), nn.BatchNorm1d(256), nn.ReLU(inplace=True), nn.Dropout(0.5),
            nn.Linear(256, 256), nn.BatchNorm1d(256), nn.ReLU(inplace=True), nn.Dropout(0.5),
            nn.Linear(256, cls_dim),
        )


@register_backbone("point_bert")
class PointBERT(PointTransformer):
    """Point-BERT fine-tuning backbone (``models/Point_BERT.py: PointTransformer``).

    Differs from Point-MAE in the mini-PointNet width (``encoder_dims`` 256 in the official
    config) followed by ``reduce_dim`` Linear(encoder_dims, trans_dim), and a BN-free head.
    """

    checkpoint = CheckpointSpec(
        title="Point-BERT",
        layouts=(
            # Point-BERT.pth: the encoder under transformer_q., with pre-training-only heads.
            Layout("Point-BERT pre-training checkpoint", marks=("transformer_q.",),
                   prefix="transformer_q.", dropped=("mask_token", "lm_head.", "cls_head.")),
            Layout("fine-tuned checkpoint", marks=("blocks.blocks.", "reduce_dim.")),
        ),
        head=(HEAD_PREFIX,), classes=("cls_dim", f"{HEAD_PREFIX}.3.weight"),
        shapes=_SHAPES, counts=_COUNTS, weights_hint=WEIGHTS_HINT,
    )

    def __init__(self, cls_dim: int = 40, num_group: int = 64, group_size: int = 32,
                 trans_dim: int = 384, depth: int = 12, num_heads: int = 6,
                 encoder_dims: int = 256, drop_path_rate: float = 0.1):
        super().__init__(cls_dim=cls_dim, num_group=num_group, group_size=group_size,
                         trans_dim=trans_dim, depth=depth, num_heads=num_heads,
                         encoder_dims=encoder_dims, drop_path_rate=drop_path_rate)

    def _add_bridge(self, encoder_dims: int, trans_dim: int) -> None:
        self.reduce_dim = nn.Linear(encoder_dims, trans_dim)

    def _make_head(self, in_dim: int, cls_dim: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Linear(in_dim, 256), nn.ReLU(inplace=True), nn.Dropout(0.5),
            nn.Linear(256, cls_dim),
        )

    def embed_patches(self, neighborhood: torch.Tensor) -> torch.Tensor:
        return self.reduce_dim(super().embed_patches(neighborhood))
