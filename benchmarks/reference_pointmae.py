"""The Point-MAE fine-tuning network written the way the official code computes it.

A baseline for the benchmarks: ``models/Point_MAE.py: PointTransformer`` of the official
repository, with timm-style ``Block`` / ``Attention`` / ``Mlp`` (explicit
``softmax(Q K^T * scale) V`` with the official reshape / permute), the Conv1d mini-PointNet on
``(B*G, C, S)`` whose concat ``[global, per-point]`` enters one ``Conv1d(512, 512, 1)``, and
``torch.max(...)[0]`` pooling. Grouping uses the same ``pointclora.ops`` primitives as
:class:`pointclora.models.PointMAE` (FPS centres, kNN, the official flat gather), so timings
compare the network code only. The state-dict keys are the official ones, the same as
``PointMAE``'s, so one set of weights loads into both::

    ref = ReferencePointMAE(cls_dim=15, num_group=128)
    ref.load_state_dict(PointMAE(cls_dim=15, num_group=128).state_dict())
"""
from __future__ import annotations

import pointclora  # noqa: F401  (first: OpenMP's wait policy is set before torch loads)

# isort: split
import torch
from timm.layers import DropPath
from torch import nn

from pointclora.ops import furthest_point_sample, gather_points, knn


class Group(nn.Module):
    """FPS centres and kNN patches, indexed through the flattened cloud as officially."""

    def __init__(self, num_group: int, group_size: int):
        super().__init__()
        self.num_group, self.group_size = num_group, group_size

    def forward(self, xyz: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch_size, num_points, _ = xyz.shape
        center = gather_points(xyz, furthest_point_sample(xyz, self.num_group))
        _, idx = knn(xyz, center, self.group_size)
        idx_base = torch.arange(0, batch_size, device=xyz.device).view(-1, 1, 1) * num_points
        idx = (idx + idx_base).view(-1)
        neighborhood = xyz.reshape(batch_size * num_points, -1)[idx, :]
        neighborhood = neighborhood.view(batch_size, self.num_group, self.group_size, 3)
        return neighborhood.contiguous() - center.unsqueeze(2), center


class Encoder(nn.Module):
    """Conv1d mini-PointNet on channels-first ``(B*G, C, S)``."""

    def __init__(self, encoder_channel: int):
        super().__init__()
        self.encoder_channel = encoder_channel
        self.first_conv = nn.Sequential(
            nn.Conv1d(3, 128, 1), nn.BatchNorm1d(128), nn.ReLU(inplace=True), nn.Conv1d(128, 256, 1)
        )
        self.second_conv = nn.Sequential(
            nn.Conv1d(512, 512, 1), nn.BatchNorm1d(512), nn.ReLU(inplace=True),
            nn.Conv1d(512, encoder_channel, 1),
        )

    def forward(self, point_groups: torch.Tensor) -> torch.Tensor:
        bs, g, n, _ = point_groups.shape
        point_groups = point_groups.reshape(bs * g, n, 3)
        feature = self.first_conv(point_groups.transpose(2, 1))  # BG 256 n
        feature_global = torch.max(feature, dim=2, keepdim=True)[0]  # BG 256 1
        feature = torch.cat([feature_global.expand(-1, -1, n), feature], dim=1)  # BG 512 n
        feature = self.second_conv(feature)  # BG C n
        feature_global = torch.max(feature, dim=2, keepdim=False)[0]  # BG C
        return feature_global.reshape(bs, g, self.encoder_channel)


class Mlp(nn.Module):
    def __init__(self, in_features: int, hidden_features: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop = nn.Dropout(0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.act(self.fc1(x)))
        return self.drop(self.fc2(x))


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int = 8):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.attn_drop = nn.Dropout(0.0)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads)
        qkv = qkv.permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = self.attn_drop(attn.softmax(dim=-1))
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.attn = Attention(dim, num_heads=num_heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class TransformerEncoder(nn.Module):
    def __init__(self, embed_dim: int, depth: int, num_heads: int, drop_path_rate: list[float]):
        super().__init__()
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, drop_path=drop_path_rate[i]) for i in range(depth)
        )

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x + pos)
        return x


class ReferencePointMAE(nn.Module):
    """Official ``PointTransformer`` (fine-tuning), same keywords as ``PointMAE``.

    Weights are PyTorch's default initialisation: load them from a ``PointMAE`` state dict.
    """

    def __init__(self, cls_dim: int = 40, num_group: int = 64, group_size: int = 32,
                 trans_dim: int = 384, depth: int = 12, num_heads: int = 6,
                 encoder_dims: int = 384, drop_path_rate: float = 0.1):
        super().__init__()
        self.trans_dim, self.depth = trans_dim, depth
        self.group_divider = Group(num_group=num_group, group_size=group_size)
        self.encoder = Encoder(encoder_channel=encoder_dims)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, trans_dim))
        self.cls_pos = nn.Parameter(torch.randn(1, 1, trans_dim))
        self.pos_embed = nn.Sequential(nn.Linear(3, 128), nn.GELU(), nn.Linear(128, trans_dim))
        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, depth)]
        self.blocks = TransformerEncoder(trans_dim, depth, num_heads, dpr)
        self.norm = nn.LayerNorm(trans_dim)
        self.cls_head_finetune = nn.Sequential(
            nn.Linear(trans_dim * 2, 256), nn.BatchNorm1d(256), nn.ReLU(inplace=True),
            nn.Dropout(0.5),
            nn.Linear(256, 256), nn.BatchNorm1d(256), nn.ReLU(inplace=True), nn.Dropout(0.5),
            nn.Linear(256, cls_dim),
        )

    def forward(self, pts: torch.Tensor) -> torch.Tensor:
        neighborhood, center = self.group_divider(pts)
        group_input_tokens = self.encoder(neighborhood)  # B G C
        cls_tokens = self.cls_token.expand(group_input_tokens.size(0), -1, -1)
        cls_pos = self.cls_pos.expand(group_input_tokens.size(0), -1, -1)
        pos = self.pos_embed(center)
        x = torch.cat((cls_tokens, group_input_tokens), dim=1)
        pos = torch.cat((cls_pos, pos), dim=1)
        x = self.norm(self.blocks(x, pos))
        concat_f = torch.cat([x[:, 0], x[:, 1:].max(1)[0]], dim=-1)
        return self.cls_head_finetune(concat_f)
