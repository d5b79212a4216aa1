"""The Point-MAE part-segmentation network written the way the official code computes it.

A baseline for ``bench_partseg.py``: ``segmentation/models/pt.py: get_model`` of the official
repository. The trunk reuses ``reference_pointmae`` (official Group, Conv1d Encoder, timm-style
blocks); the blocks return the features after blocks 3, 7 and 11; the head repeats the global
feature over the N points and concatenates it (3392 channels into ``convs1``), and
``PointNetFeaturePropagation`` computes the full ``N x G`` squared-distance matrix with the
expanded formula, sorts it, keeps 3 neighbours and runs ``Conv1d(1155, 1536)`` on every point.
Same keywords and state-dict keys as :class:`pointclora.models.PointMAEPartSeg`::

    ref = ReferencePartSeg(num_group=128)
    ref.load_state_dict(PointMAEPartSeg(num_group=128).state_dict())

Inputs as in the official loop: points ``(B, 3, N)`` and the one-hot category ``(B, 1, 16)``.
"""
from __future__ import annotations

import pointclora  # noqa: F401  (first: OpenMP's wait policy is set before torch loads)

# isort: split
import torch
import torch.nn.functional as F
from reference_pointmae import Encoder, Group
from reference_pointmae import TransformerEncoder as _Blocks
from torch import nn

from pointclora.models.partseg import default_fetch_blocks


def square_distance(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """``(B, N, M)`` squared distances, ``|a|^2 + |b|^2 - 2 a.b`` as officially."""
    B, N, _ = src.shape
    _, M, _ = dst.shape
    dist = -2 * torch.matmul(src, dst.permute(0, 2, 1))
    dist += torch.sum(src**2, -1).view(B, N, 1)
    dist += torch.sum(dst**2, -1).view(B, 1, M)
    return dist


def index_points(points: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    B = points.shape[0]
    view_shape = [B] + [1] * (idx.dim() - 1)
    repeat_shape = [1, *idx.shape[1:]]
    batch_indices = torch.arange(B, device=points.device).view(view_shape).repeat(repeat_shape)
    return points[batch_indices, idx, :]


class PointNetFeaturePropagation(nn.Module):
    def __init__(self, in_channel: int, mlp: list[int]):
        super().__init__()
        self.mlp_convs = nn.ModuleList()
        self.mlp_bns = nn.ModuleList()
        last_channel = in_channel
        for out_channel in mlp:
            self.mlp_convs.append(nn.Conv1d(last_channel, out_channel, 1))
            self.mlp_bns.append(nn.BatchNorm1d(out_channel))
            last_channel = out_channel

    def forward(self, xyz1, xyz2, points1, points2):
        """``xyz1 (B, 3, N)``, ``xyz2 (B, 3, S)``, ``points1 (B, D, N)``, ``points2 (B, D', S)``."""
        xyz1, xyz2 = xyz1.permute(0, 2, 1), xyz2.permute(0, 2, 1)
        points2 = points2.permute(0, 2, 1)
        B, N, _ = xyz1.shape
        dists = square_distance(xyz1, xyz2)
        dists, idx = dists.sort(dim=-1)
        dists, idx = dists[:, :, :3], idx[:, :, :3]
        dist_recip = 1.0 / (dists + 1e-8)
        norm = torch.sum(dist_recip, dim=2, keepdim=True)
        weight = dist_recip / norm
        interpolated = torch.sum(index_points(points2, idx) * weight.view(B, N, 3, 1), dim=2)
        new_points = torch.cat([points1.permute(0, 2, 1), interpolated], dim=-1)
        new_points = new_points.permute(0, 2, 1)
        for conv, bn in zip(self.mlp_convs, self.mlp_bns, strict=True):
            new_points = F.relu(bn(conv(new_points)))
        return new_points


class FetchingBlocks(_Blocks):
    """The official segmentation ``TransformerEncoder``: outputs after ``fetch_idx`` blocks."""

    def __init__(self, *args, fetch_idx=(3, 7, 11)):
        super().__init__(*args)
        self.fetch_idx = list(fetch_idx)

    def forward(self, x, pos):
        feature_list = []
        for i, block in enumerate(self.blocks):
            x = block(x + pos)
            if i in self.fetch_idx:
                feature_list.append(x)
        return feature_list


class ReferencePartSeg(nn.Module):
    """Official ``get_model(cls_dim)``, with ``PointMAEPartSeg``'s keywords."""

    def __init__(self, num_parts: int = 50, num_categories: int = 16, num_group: int = 128,
                 group_size: int = 32, trans_dim: int = 384, depth: int = 12,
                 num_heads: int = 6, encoder_dims: int = 384, drop_path_rate: float = 0.1):
        super().__init__()
        self.num_categories = num_categories
        self.group_divider = Group(num_group=num_group, group_size=group_size)
        self.encoder = Encoder(encoder_channel=encoder_dims)
        self.pos_embed = nn.Sequential(nn.Linear(3, 128), nn.GELU(), nn.Linear(128, trans_dim))
        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, depth)]
        self.blocks = FetchingBlocks(trans_dim, depth, num_heads, dpr,
                                     fetch_idx=default_fetch_blocks(depth))
        self.norm = nn.LayerNorm(trans_dim)
        self.label_conv = nn.Sequential(nn.Conv1d(num_categories, 64, kernel_size=1, bias=False),
                                        nn.BatchNorm1d(64), nn.LeakyReLU(0.2))
        self.propagation_0 = PointNetFeaturePropagation(3 * trans_dim + 3, [trans_dim * 4, 1024])
        self.convs1 = nn.Conv1d(1024 + 6 * trans_dim + 64, 512, 1)
        self.dp1 = nn.Dropout(0.5)
        self.convs2 = nn.Conv1d(512, 256, 1)
        self.convs3 = nn.Conv1d(256, num_parts, 1)
        self.bns1 = nn.BatchNorm1d(512)
        self.bns2 = nn.BatchNorm1d(256)
        self.relu = nn.ReLU()

    def forward(self, pts: torch.Tensor, cls_label: torch.Tensor) -> torch.Tensor:
        B, C, N = pts.shape
        pts = pts.transpose(-1, -2)  # B N 3
        neighborhood, center = self.group_divider(pts)
        group_input_tokens = self.encoder(neighborhood)  # B G C
        pos = self.pos_embed(center)
        feature_list = self.blocks(group_input_tokens, pos)
        feature_list = [self.norm(x).transpose(-1, -2).contiguous() for x in feature_list]
        x = torch.cat((feature_list[0], feature_list[1], feature_list[2]), dim=1)
        x_max = torch.max(x, 2)[0]
        x_avg = torch.mean(x, 2)
        x_max_feature = x_max.view(B, -1).unsqueeze(-1).repeat(1, 1, N)
        x_avg_feature = x_avg.view(B, -1).unsqueeze(-1).repeat(1, 1, N)
        cls_label_one_hot = cls_label.view(B, self.num_categories, 1)
        cls_label_feature = self.label_conv(cls_label_one_hot).repeat(1, 1, N)
        x_global_feature = torch.cat((x_max_feature, x_avg_feature, cls_label_feature), 1)
        f_level_0 = self.propagation_0(pts.transpose(-1, -2), center.transpose(-1, -2),
                                       pts.transpose(-1, -2), x)
        x = torch.cat((f_level_0, x_global_feature), 1)
        x = self.relu(self.bns1(self.convs1(x)))
        x = self.dp1(x)
        x = self.relu(self.bns2(self.convs2(x)))
        x = self.convs3(x)
        x = F.log_softmax(x, dim=1)
        return x.permute(0, 2, 1)
