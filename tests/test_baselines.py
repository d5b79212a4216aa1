"""The comparison methods (Adapter and its AOFT variants, VPT-Deep and VPT-Deep+AOFT, IDPT,
DAPT, PointGST) on a tiny Point-MAE and a tiny timm ViT: their equations written out here,
what trains, identity where the method starts as the backbone, adapter-only files, and the
refusal to merge."""
import copy
import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pointclora.adapters import (
    adapter_config,
    adapter_state_dict,
    apply_adapter,
    load_adapter,
    merge_adapter,
    parameter_report,
    registry,
    register_model_defaults,
    trained_keys,
)
from pointclora.models import PointMAE

D = 48
TINY = dict(cls_dim=4, depth=2, num_group=16, group_size=8, trans_dim=D, encoder_dims=D,
            num_heads=2)
HEAD_AND_TOKENS = r"cls_head_finetune\..*|cls_token|cls_pos"
VIT_QUALNAME = "timm.models.vision_transformer.VisionTransformer"
VIT_DEFAULTS = {"target_modules": ["attn.qkv", "attn.proj"], "blocks": r"blocks\.\d+",
                "head": ["head"], "tokens": ["cls_token", "pos_embed"]}
# (method, options) -> the parameters it adds, by full name on TINY
CASES = {
    "adapter": ("adapter", {}, r"blocks\.blocks\.\d\.(attn|mlp)\.adapter_(down|up)(_bias)?"),
    "adapter_aoft_star": ("adapter", {"aoft": "star"},
                          r"blocks\.blocks\.\d\.(attn|mlp)\.adapter_(q_down|q_up|lambda|"
                          r"down_bias|up_bias)"),
    "adapter_aoft_plain": ("adapter", {"aoft": "plain"},
                           r"blocks\.blocks\.\d\.(attn|mlp)\.adapter_(q_down|up|down_bias|"
                           r"up_bias)"),
    "vpt_deep": ("vpt_deep", {}, r"blocks\.blocks\.\d\.vpt_prompts"),
    "vpt_deep_aoft": ("vpt_deep", {"aoft": True}, r"blocks\.blocks\.\d\.vpt_q"),
}
IDENTITY_AT_INIT = {"adapter", "adapter_aoft_star", "adapter_aoft_plain"}


@pytest.fixture(scope="module")
def pretrained():
    torch.manual_seed(0)
    return PointMAE(**TINY).eval()


@pytest.fixture
def backbone(pretrained):
    return copy.deepcopy(pretrained)


@pytest.fixture(scope="module")
def points():
    return torch.rand(4, 64, 3, generator=torch.Generator().manual_seed(1)) * 2 - 1


LABELS = torch.tensor([0, 1, 2, 3])


@torch.no_grad()
def nudge(model: nn.Module) -> None:
    """Move every trainable tensor away from its init, as training would."""
    g = torch.Generator().manual_seed(2)
    for p in model.parameters():
        if p.requires_grad:
            p.add_(0.1 * torch.randn(p.shape, generator=g))


def dense_q(q: torch.Tensor) -> torch.Tensor:
    """AOFT's ``Q(q) = [[q0, -q_bar^T], [q_bar, I - q_bar q_bar^T / (1 + q0)]]``, formed whole."""
    q0, qb = q[0], q[1:]
    n = q.numel()
    out = torch.empty(n, n, dtype=q.dtype)
    out[0, 0], out[0, 1:], out[1:, 0] = q0, -qb, qb
    out[1:, 1:] = torch.eye(n - 1, dtype=q.dtype) - torch.outer(qb, qb) / (1 + q0)
    return out


def point_mae_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A Point-MAE pre-norm block written out (eval mode): attention with explicit softmax."""
    heads = block.attn.num_heads
    B, N, C = x.shape
    h = F.layer_norm(x, (C,), block.norm1.weight, block.norm1.bias, block.norm1.eps)
    q, k, v = (h @ block.attn.qkv.weight.t()).reshape(B, N, 3, heads, C // heads).unbind(2)
    scores = torch.einsum("bnhc,bmhc->bhnm", q, k) / math.sqrt(C // heads)
    mixed = torch.einsum("bhnm,bmhc->bnhc", scores.softmax(-1), v).reshape(B, N, C)
    x = x + block.attn.proj(mixed)
    h = F.layer_norm(x, (C,), block.norm2.weight, block.norm2.bias, block.norm2.eps)
    return x + block.mlp.fc2(F.gelu(block.mlp.fc1(h)))


# --- every case: what trains, identity, files, merge refusal -------------------------------

@pytest.mark.parametrize("case", CASES)
def test_trainable_set_and_gradients(case, backbone, points):
    method, options, added = CASES[case]
    names = {n for n, _ in backbone.named_parameters()}
    apply_adapter(backbone, method, **options)
    new = {n for n, _ in backbone.named_parameters()} - {n.replace(".base_layer", "")
                                                        for n in names}
    new = {n for n in new if "base_layer" not in n}
    assert new and all(re.fullmatch(added, n) for n in new)
    trainable = {n for n, p in backbone.named_parameters() if p.requires_grad}
    assert trainable == new | {n for n in names if re.fullmatch(HEAD_AND_TOKENS, n)}
    nudge(backbone)  # factors starting at zero would block their partners' gradients
    F.cross_entropy(backbone.train()(points), LABELS).backward()
    assert {n for n, p in backbone.named_parameters() if p.grad is not None and p.grad.any()} \
        == trainable


@pytest.mark.parametrize("case", CASES)
def test_identity_where_documented(case, backbone, points):
    method, options, _ = CASES[case]
    reference = backbone(points)
    apply_adapter(backbone, method, **options)
    out = backbone(points)
    if case in IDENTITY_AT_INIT:
        assert torch.equal(out, reference)
    else:  # prompts join the attention at once (documented)
        assert out.shape == reference.shape and not torch.allclose(out, reference)


@pytest.mark.parametrize("case", CASES)
def test_adapter_file_round_trip_and_merge_refused(case, backbone, pretrained, points, tmp_path):
    method, options, _ = CASES[case]
    apply_adapter(backbone, method, **options)
    nudge(backbone)
    expected = backbone.eval()(points)
    payload = adapter_state_dict(backbone)
    assert set(payload["state_dict"]) == set(trained_keys(backbone))
    assert not any("base_layer" in k or k.startswith("encoder.") for k in payload["state_dict"])
    torch.save(payload, tmp_path / "adapter.pt")
    restored = load_adapter(copy.deepcopy(pretrained), tmp_path / "adapter.pt")
    assert adapter_config(restored) == adapter_config(backbone)
    assert torch.equal(restored.eval()(points), expected)
    keys = list(backbone.state_dict())
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        merge_adapter(backbone)
    assert list(backbone.state_dict()) == keys and adapter_config(backbone) is not None
    assert torch.equal(backbone(points), expected)


# --- equations ------------------------------------------------------------------------------

@pytest.mark.parametrize("aoft", ["none", "star", "plain"])
def test_adapter_equation(aoft, backbone):
    torch.manual_seed(3)
    apply_adapter(backbone, "adapter", aoft=aoft, bottleneck=4, scale=0.5)
    nudge(backbone)
    site = backbone.blocks.blocks[1].mlp
    u = torch.randn(2, 5, D)
    y = site.base_layer(u)
    if aoft == "none":
        down, up = site.adapter_down, site.adapter_up
    else:
        down = dense_q(site.adapter_q_down.detach())[:, :4].t()
        up = site.adapter_up if aoft == "plain" else \
            dense_q(site.adapter_q_up.detach())[:, :4] @ torch.diag(site.adapter_lambda)
    hidden = F.gelu(y @ down.t() + site.adapter_down_bias)
    expected = y + 0.5 * (hidden @ up.t() + site.adapter_up_bias)
    torch.testing.assert_close(site(u), expected, atol=1e-5, rtol=1e-5)


def test_adapter_sits_after_the_attention_and_the_ffn(backbone):
    apply_adapter(backbone, "adapter", bottleneck=4)
    wrapped = {n for n, m in backbone.named_modules() if type(m).__name__ == "BottleneckAdapter"}
    assert wrapped == {f"blocks.blocks.{i}.{s}" for i in (0, 1) for s in ("attn", "mlp")}


@pytest.mark.parametrize("aoft", [False, True])
def test_vpt_deep_equation(aoft, backbone):
    apply_adapter(backbone, "vpt_deep", num_prompts=3, aoft=aoft)
    nudge(backbone)
    wrapper = backbone.blocks.blocks[0]
    prompts = dense_q(wrapper.vpt_q.detach())[:, :3].t() if aoft else wrapper.vpt_prompts
    x = torch.randn(2, 7, D)
    full = point_mae_block(wrapper.base_layer, torch.cat([x, prompts.expand(2, -1, -1)], 1))
    torch.testing.assert_close(wrapper(x), full[:, :7], atol=1e-5, rtol=1e-5)


def test_vpt_deep_aoft_prompts_start_orthonormal(backbone):
    apply_adapter(backbone, "vpt_deep", num_prompts=5, aoft=True)
    p = backbone.blocks.blocks[1].prompts()
    torch.testing.assert_close(p @ p.t(), torch.eye(5), atol=1e-5, rtol=0)


def test_parameter_counts_match_the_formulas(pretrained):
    k, n, blocks, sites = 8, 10, 2, 4

    def added(method, **options):
        model = apply_adapter(copy.deepcopy(pretrained), method, **options)
        return parameter_report(model)["trainable_no_head"] - 2 * D  # tokens

    assert added("adapter") == sites * (2 * D * k + k + D)
    assert added("adapter", aoft="star") == sites * (3 * D + 2 * k)
    assert added("adapter", aoft="plain") == sites * (2 * D + D * k + k)
    assert added("vpt_deep") == blocks * n * D
    assert added("vpt_deep", aoft=True) == blocks * D


def test_options_are_checked(backbone):
    with pytest.raises(ValueError, match="sites must be a non-empty list"):
        apply_adapter(backbone, "adapter", sites="attn")
    with pytest.raises(ValueError, match="num_prompts=60 exceeds the width 48"):
        apply_adapter(backbone, "vpt_deep", num_prompts=60, aoft=True)
    assert adapter_config(backbone) is None


# --- timm ViT: the same wrappers on stock timm blocks -------------------------------------

@pytest.fixture
def vit(monkeypatch):
    timm = pytest.importorskip("timm")
    monkeypatch.setattr(registry, "_MODEL_DEFAULTS", {})
    register_model_defaults(VIT_QUALNAME, VIT_DEFAULTS)
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", num_classes=10, pretrained=False,
                             img_size=32, patch_size=8, depth=2).eval()


@pytest.mark.parametrize("case", CASES)
def test_timm_vit_takes_every_case(case, vit):
    method, options, _ = CASES[case]
    images = torch.randn(2, 3, 32, 32)
    reference = vit(images)
    apply_adapter(vit, method, **options)
    out = vit(images)
    assert out.shape == reference.shape
    assert torch.equal(out, reference) is (case in IDENTITY_AT_INIT)
    nudge(vit)
    F.cross_entropy(vit.train()(images), torch.tensor([1, 2])).backward()
    assert all(p.grad is not None for p in vit.parameters() if p.requires_grad)
