"""The official Point-MAE / Point-BERT computations written out with a model's weights (plain
tensor formulas, no module of the package), shared by the model tests."""
import torch
import torch.nn.functional as F
from torch import nn


def conv1d_encoder(encoder, neighborhood):
    """The official mini-PointNet: Conv1d on channels-first, concat [global, per-point]."""
    B, G, S, _ = neighborhood.shape
    x = neighborhood.reshape(B * G, S, 3).transpose(2, 1)
    feature = encoder.first_conv(x)
    glob = torch.max(feature, dim=2, keepdim=True)[0]
    feature = torch.cat([glob.expand(-1, -1, S), feature], dim=1)
    feature = encoder.second_conv(feature)
    return torch.max(feature, dim=2)[0].reshape(B, G, -1)


def explicit_attention(attn, x):
    B, N, C = x.shape
    h = attn.num_heads
    qkv = x @ attn.qkv.weight.T
    q, k, v = (t.reshape(B, N, h, C // h).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
    weights = torch.softmax(q @ k.transpose(-2, -1) * (C // h) ** -0.5, dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(B, N, C)
    return out @ attn.proj.weight.T + attn.proj.bias


def official_block(blk, x):
    """One official transformer block (pre-norm attention then MLP, eval mode) on ``x``."""
    C = x.shape[-1]
    x = x + explicit_attention(
        blk.attn, F.layer_norm(x, (C,), blk.norm1.weight, blk.norm1.bias, eps=1e-5))
    h = F.layer_norm(x, (C,), blk.norm2.weight, blk.norm2.bias, eps=1e-5)
    return x + F.gelu(h @ blk.mlp.fc1.weight.T + blk.mlp.fc1.bias) @ blk.mlp.fc2.weight.T \
        + blk.mlp.fc2.bias


def randomise(model, seed=3):
    """Non-trivial weights everywhere (zero biases / unit norms would hide wiring bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.copy_(t + 0.05 * torch.randn(t.shape, generator=g))
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    return model
