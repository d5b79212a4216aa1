"""IDPT: an instance-aware prompt generated from the patch tokens before one block.

Before block ``layer`` (the last by default, as the ScanObjectNN recipe of IDPT), a
DGCNN-style generator reads that block's patch tokens ``T (B, G, d)``: three EdgeConv
layers on the kNN graph of the features (``k`` neighbours, recomputed per layer),
``e_ij = LeakyReLU(BN(W [t_j - t_i; t_i]))`` max-pooled over ``j``, their outputs
concatenated and mixed by ``LeakyReLU(BN(W_5 [x_1; x_2; x_3]))``, then max-pooled over the
patches into one token ``p (B, d)``, plus a learned position ``p_pos``. The block runs on
``[x; p + p_pos]``. With ``keep_prompt`` the prompt's output stays in the sequence (the
block must then be the model's last), so the model's own head reads it (Point-MAE: in the
max over tokens).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from .api import _matches
from .blocks import BlockMethod, BlockOptions, NotMergeable, output_width, run_with_prompts
from .registry import BOOL, POSITIVE_INT, Check, option, register_method

INT = Check(lambda v: isinstance(v, int) and not isinstance(v, bool), "an int")
NON_NEGATIVE_INT = Check(lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
                         "an int >= 0")
SLOPE = 0.2  # LeakyReLU slope of the official generator


def edge_features(x: torch.Tensor, k: int) -> torch.Tensor:
    """``x (B, C, G)`` -> ``(B, 2C, G, k)``: ``[x_j - x_i; x_i]`` over the ``k`` nearest
    features ``j`` of each ``i`` (itself included), as DGCNN."""
    feats = x.transpose(1, 2)  # (B, G, C)
    k = min(k, feats.shape[1])
    sq = feats.square().sum(-1)
    neg_dist = 2 * feats @ feats.transpose(1, 2) - sq[:, :, None] - sq[:, None, :]
    idx = neg_dist.topk(k, dim=-1).indices  # (B, G, k)
    neighbours = torch.gather(feats[:, None].expand(-1, feats.shape[1], -1, -1), 2,
                              idx[..., None].expand(-1, -1, -1, feats.shape[-1]))
    centre = feats[:, :, None].expand_as(neighbours)
    return torch.cat((neighbours - centre, centre), dim=-1).permute(0, 3, 1, 2)


class PromptGenerator(nn.Module):
    """DGCNN over the patch tokens, max-pooled into one prompt token."""

    def __init__(self, dim: int, k: int, layers: int = 3):
        super().__init__()
        self.k = k
        self.edge = nn.ModuleList(
            nn.Sequential(nn.Conv2d(2 * dim, dim, 1, bias=False), nn.BatchNorm2d(dim),
                          nn.LeakyReLU(SLOPE)) for _ in range(layers))
        self.fuse = nn.Sequential(nn.Conv1d(layers * dim, dim, 1, bias=False),
                                  nn.BatchNorm1d(dim), nn.LeakyReLU(SLOPE))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, G, d)`` -> ``(B, 1, d)``."""
        x, levels = tokens.transpose(1, 2), []
        for conv in self.edge:
            x = conv(edge_features(x, self.k)).amax(dim=-1)
            levels.append(x)
        return self.fuse(torch.cat(levels, dim=1)).amax(dim=-1)[:, None]


class IDPTBlock(NotMergeable):
    """A block run with one prompt generated from its own input's patch tokens."""

    why = "the prompt is computed from each input (a DGCNN over its patch tokens)"

    def __init__(self, base_layer: nn.Module, k: int, skip_tokens: int, keep_prompt: bool):
        super().__init__()
        self.base_layer = base_layer
        d = output_width(base_layer)
        self.skip_tokens, self.keep_prompt = skip_tokens, keep_prompt
        self.idpt_generator = PromptGenerator(d, k)
        self.idpt_prompt_pos = nn.Parameter(nn.init.trunc_normal_(torch.zeros(d), std=0.02))

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        prompt = self.idpt_generator(x[:, self.skip_tokens:]) + self.idpt_prompt_pos
        return run_with_prompts(self.base_layer, x, prompt, *args, keep=self.keep_prompt,
                                **kwargs)


@dataclass
class IDPTOptions(BlockOptions):
    layer: int = option(-1, INT, "which of the blocks gets the prompt (Python index)")
    k: int = option(20, POSITIVE_INT, "neighbours of the feature kNN graph")
    skip_tokens: int = option(1, NON_NEGATIVE_INT,
                              "leading tokens that are not patches (the cls token)")
    keep_prompt: bool = option(True, BOOL,
                               "the prompt's output stays in the sequence (last block only)")

    def bind(self, model: nn.Module) -> IDPTOptions:
        """``blocks`` narrowed to the one block ``layer`` picks (then ``layer=0``)."""
        bound = super().bind(model)
        names = [n for n, _ in model.named_modules() if n and _matches(n, bound.blocks)]
        if not names:
            raise ValueError(f"idpt: blocks={bound.blocks!r} matches no module of "
                             f"{type(model).__name__}")
        if not -len(names) <= bound.layer < len(names):
            raise ValueError(f"idpt layer={bound.layer} is out of range for the model's "
                             f"{len(names)} blocks")
        chosen = names[bound.layer]
        if bound.keep_prompt and chosen != names[-1]:
            raise ValueError(f"idpt keep_prompt=True needs the last block ({names[-1]}), "
                             f"layer={bound.layer} picks {chosen}; pass keep_prompt=False")
        return dataclasses.replace(bound, blocks=[chosen], layer=0)


@register_method
class IDPT(BlockMethod):
    name = "idpt"
    Options = IDPTOptions

    def wrap(self, name: str, module: nn.Module) -> IDPTBlock:
        o = self.options
        return IDPTBlock(module, o.k, o.skip_tokens, o.keep_prompt)

