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
from official_forward import official_block
from torch import nn

from pointclora.adapters import (
    adapter_config,
    adapter_state_dict,
    apply_adapter,
    load_adapter,
    merge_adapter,
    parameter_report,
    register_model_defaults,
    registry,
    resolve_options,
    trained_keys,
)
from pointclora.analysis import module_macs, official_graph, sample_points
from pointclora.models import PointMAE
from pointclora.models.partseg import PointMAEPartSeg

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
    "dapt": ("dapt", {"bottleneck": 8},
             r"blocks\.blocks\.\d\.(dapt_prompt_(gamma|beta)|base_layer\.(mlp\.dapt_.*|"
             r"(norm1|norm2|attn\.qkv|attn\.proj|mlp\.base_layer\.fc1|mlp\.base_layer\.fc2)"
             r"\.dapt_(gamma|beta)))"),
    "pointgst": ("pointgst", {"rank": 4, "local": 8}, r"blocks\.blocks\.\d\.pgst_.*"),
    "idpt": ("idpt", {"k": 4}, r"blocks\.blocks\.1\.idpt_(generator\..*|prompt_pos)"),
}
IDENTITY_AT_INIT = {"adapter", "adapter_aoft_star", "adapter_aoft_plain", "pointgst"}


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


@torch.no_grad()
def open_dapt_gates(model: nn.Module) -> None:
    """DAPT's per-token scale is a ReLU: on a random tiny model whose tokens are alike it can
    be zero for every token. A positive bias opens it, so that gradients are checked."""
    for m in model.modules():
        if hasattr(m, "dapt_scale"):
            m.dapt_scale.bias.fill_(1.0)


def dense_q(q: torch.Tensor) -> torch.Tensor:
    """AOFT's ``Q(q) = [[q0, -q_bar^T], [q_bar, I - q_bar q_bar^T / (1 + q0)]]``, formed whole."""
    q0, qb = q[0], q[1:]
    n = q.numel()
    out = torch.empty(n, n, dtype=q.dtype)
    out[0, 0], out[0, 1:], out[1:, 0] = q0, -qb, qb
    out[1:, 1:] = torch.eye(n - 1, dtype=q.dtype) - torch.outer(qb, qb) / (1 + q0)
    return out


# --- every case: what trains, identity, files, merge refusal -------------------------------

@pytest.mark.parametrize("case", CASES)
def test_trainable_set_and_gradients(case, backbone, points):
    method, options, added = CASES[case]
    names = {n for n, _ in backbone.named_parameters()}
    apply_adapter(backbone, method, **options)
    new = {n for n, _ in backbone.named_parameters() if n.replace(".base_layer", "") not in names}
    assert new and all(re.fullmatch(added, n) for n in new)
    trainable = {n for n, p in backbone.named_parameters() if p.requires_grad}
    assert trainable == new | {n for n in names if re.fullmatch(HEAD_AND_TOKENS, n)}
    nudge(backbone)  # factors starting at zero would block their partners' gradients
    open_dapt_gates(backbone)
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
    backbone_keys = set(pretrained.state_dict())  # nothing frozen is saved
    assert not [k for k in payload["state_dict"] if k.replace(".base_layer", "") in backbone_keys
                and not re.fullmatch(HEAD_AND_TOKENS, k)]
    torch.save(payload, tmp_path / "adapter.pt")
    restored = load_adapter(copy.deepcopy(pretrained), tmp_path / "adapter.pt")
    assert adapter_config(restored) == adapter_config(backbone)
    assert torch.equal(restored.eval()(points), expected)
    keys = list(backbone.state_dict())
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        merge_adapter(backbone)
    assert list(backbone.state_dict()) == keys and adapter_config(backbone) is not None
    assert torch.equal(backbone(points), expected)


@pytest.mark.parametrize("case", CASES)
def test_a_file_that_does_not_fit_leaves_the_model_as_it_was(case, backbone, pretrained, points):
    method, options, _ = CASES[case]
    apply_adapter(backbone, method, **options)
    payload = adapter_state_dict(backbone)
    payload["state_dict"].pop(next(k for k in payload["state_dict"] if re.search(r"\.\w+_", k)))
    fresh = copy.deepcopy(pretrained)
    with pytest.raises(ValueError, match="does not fit this model: missing"):
        load_adapter(fresh, payload)
    assert adapter_config(fresh) is None
    assert [(n, type(m)) for n, m in fresh.named_modules()] == \
        [(n, type(m)) for n, m in pretrained.named_modules()]
    assert torch.equal(fresh(points), pretrained(points))


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
    full = official_block(wrapper.base_layer, torch.cat([x, prompts.expand(2, -1, -1)], 1))
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
    # one generator: three EdgeConvs (2D -> D) and the fusion (3D -> D), BN affine, p_pos
    # per block: adapter (LN, gate, down, up), scale-shifts of qkv, proj, fc1, fc2, norm1,
    # norm2 and the prompt
    k = 64
    adapter = 2 * D + (D + 1) + (D * k + k) + (k * D + D)
    shifts = 2 * (3 * D + D + 4 * D + D + D + D + D)
    assert added("dapt") == blocks * (adapter + shifts)
    r = 36
    assert added("pointgst") == blocks * ((D * r + r) + (r * D + D) + (r * r + r) + 2 * 2 * r)
    assert added("idpt") == 3 * (2 * D * D + 2 * D) + (3 * D * D + 2 * D) + D


def test_options_are_checked(backbone):
    with pytest.raises(ValueError, match="sites must be a non-empty list"):
        apply_adapter(backbone, "adapter", sites="attn")
    with pytest.raises(ValueError, match="num_prompts=60 exceeds the width 48"):
        apply_adapter(backbone, "vpt_deep", num_prompts=60, aoft=True)
    assert adapter_config(backbone) is None


def bn_eval(bn: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """BatchNorm in eval mode on the last dimension, written out."""
    return (h - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias


def test_idpt_equation(backbone):
    apply_adapter(backbone, "idpt", k=3)
    nudge(backbone)
    wrapper = backbone.blocks.blocks[1].eval()
    gen, k = wrapper.idpt_generator, 3
    x = torch.randn(2, 9, D)
    feats, levels = x[:, 1:], []  # the cls token is not a patch
    for conv, bn, _ in gen.edge:
        w = conv.weight[:, :, 0, 0]
        out = torch.empty(2, 8, D)
        for b in range(2):  # brute force, one patch at a time
            near = torch.cdist(feats[b], feats[b]).argsort(dim=1)[:, :k]
            for i in range(8):
                edges = torch.cat([feats[b, near[i]] - feats[b, i], feats[b, i].expand(k, -1)], 1)
                out[b, i] = F.leaky_relu(bn_eval(bn, edges @ w.t()), 0.2).amax(0)
        levels.append(out)
        feats = out
    conv, bn, _ = gen.fuse
    fused = F.leaky_relu(bn_eval(bn, torch.cat(levels, -1) @ conv.weight[:, :, 0].t()), 0.2)
    prompt = fused.amax(1) + wrapper.idpt_prompt_pos
    expected = official_block(wrapper.base_layer, torch.cat([x, prompt[:, None]], 1))
    torch.testing.assert_close(wrapper(x), expected, atol=1e-4, rtol=1e-4)  # prompt kept


def dapt_block_by_hand(wrapper: nn.Module, t: torch.Tensor):
    """One DAPT block written out (eval mode): its output and the prompt it makes."""
    blk, (B, M, C) = wrapper.base_layer, t.shape

    def shifted(m, y):
        return y * m.dapt_gamma + m.dapt_beta

    def linear(m, y):
        bias = m.base_layer.bias if m.base_layer.bias is not None else 0
        return shifted(m, y @ m.base_layer.weight.t() + bias)

    def norm(m, y):
        return F.layer_norm(y, (C,), m.weight, m.bias, m.eps)

    h = shifted(blk.norm1, norm(blk.norm1.base_layer, t))
    heads = blk.attn.num_heads
    q, k, v = linear(blk.attn.qkv, h).reshape(B, M, 3, heads, C // heads).unbind(2)
    scores = torch.einsum("bnhc,bmhc->bhnm", q, k) / math.sqrt(C // heads)
    mixed = torch.einsum("bhnm,bmhc->bnhc", scores.softmax(-1), v).reshape(B, M, C)
    t = t + linear(blk.attn.proj, mixed)
    h = shifted(blk.norm2, norm(blk.norm2.base_layer, t))
    ffn = blk.mlp
    f = linear(ffn.base_layer.fc2, F.gelu(linear(ffn.base_layer.fc1, h)))
    hn = norm(ffn.dapt_norm, h)
    gate = F.relu(hn @ ffn.dapt_scale.weight.t() + ffn.dapt_scale.bias)
    a = gate * (F.gelu(hn @ ffn.dapt_down.weight.t() + ffn.dapt_down.bias) @ ffn.dapt_up.weight.t()
                + ffn.dapt_up.bias)
    prompt = F.gelu(a).mean(1, keepdim=True) * wrapper.dapt_prompt_gamma + wrapper.dapt_prompt_beta
    return t + f + a, prompt


def test_dapt_equation(backbone):
    apply_adapter(backbone, "dapt", bottleneck=4)
    nudge(backbone)
    open_dapt_gates(backbone)
    first, last = backbone.blocks.blocks.eval()
    x = torch.randn(2, 7, D)
    out0, p0 = dapt_block_by_hand(first, x)
    out1, p1 = dapt_block_by_hand(last, torch.cat([out0, p0], 1))  # the prompt carried on
    torch.testing.assert_close(last(first(x)), torch.cat([out1, p1], 1), atol=1e-5, rtol=1e-5)
    assert first.carry.tokens is None  # nothing held between passes


def test_pointgst_bases(backbone, points):
    apply_adapter(backbone, "pointgst", rank=4, local=8)
    backbone(points)
    spectra = backbone.pos_embed.spectra
    _, centres = backbone.group(points)
    for b in range(2):
        c = centres[b]
        n = c.shape[0]
        adjacency = torch.empty(n, n)
        smallest = min((c[i] - c[j]).norm() for i in range(n) for j in range(n) if i != j)
        for i in range(n):
            for j in range(n):
                adjacency[i, j] = 1 / ((c[i] - c[j]).norm() / smallest + (i == j))
        degree = adjacency.sum(1)
        laplacian = torch.eye(n) - adjacency / torch.sqrt(degree[:, None] * degree[None, :])
        u = spectra.basis[b]
        eigenvalues = torch.diagonal(u.t() @ laplacian @ u)
        torch.testing.assert_close(laplacian @ u, u * eigenvalues, atol=1e-4, rtol=0)
        torch.testing.assert_close(u.t() @ u, torch.eye(n), atol=1e-4, rtol=0)
        assert (eigenvalues.diff() >= -1e-5).all()
        # z-order: the quantised coordinates' bits interleaved x, y, z from the top
        cells = ((c - c.amin(0)) / (c.amax(0) - c.amin(0)).max() * 1023).round().long()
        keys = [int("".join(f"{int(v):010b}"[bit] for bit in range(10) for v in cell), 2)
                for cell in cells]
        assert spectra.order[b].tolist() == sorted(range(n), key=keys.__getitem__)


def test_pointgst_equation(backbone, points):
    apply_adapter(backbone, "pointgst", rank=4, local=8, scale=0.5)
    nudge(backbone)
    backbone(points)  # the bases of these clouds
    spectra, wrapper = backbone.pos_embed.spectra, backbone.blocks.blocks[1]
    x = torch.randn(4, 17, D)
    z = x @ wrapper.pgst_down.weight.t() + wrapper.pgst_down.bias
    h, patches = F.silu(z), z[:, 1:]

    def tune(v, norm):
        normed = F.layer_norm(v, (4,), norm.weight, norm.bias, norm.eps)
        return v + F.silu(normed @ wrapper.pgst_mix.weight.t() + wrapper.pgst_mix.bias)

    extra = torch.zeros_like(patches)
    for b in range(4):
        u = spectra.basis[b]
        extra[b] += u @ tune(u.t() @ patches[b], wrapper.pgst_norm_global)
        for g in range(2):
            idx = spectra.order[b, 8 * g: 8 * (g + 1)]
            us = spectra.local_basis[b, g]
            extra[b, idx] += us @ tune(us.t() @ patches[b, idx], wrapper.pgst_norm_local)
    h = torch.cat([h[:, :1], h[:, 1:] + extra], 1)
    expected = official_block(wrapper.base_layer, x) + 0.5 * (
        h @ wrapper.pgst_up.weight.t() + wrapper.pgst_up.bias)
    torch.testing.assert_close(wrapper(x), expected, atol=1e-4, rtol=1e-4)


def test_pointgst_refusals(backbone, points):
    apply_adapter(backbone, "pointgst", local=5)
    with pytest.raises(ValueError, match="local=5 must divide the number of patches 16"):
        backbone(points)


def test_idpt_picks_one_block(backbone, pretrained):
    options = resolve_options("idpt", {}, pretrained)
    assert options["blocks"] == ["blocks.blocks.1"] and options["layer"] == 0
    assert resolve_options("idpt", options, pretrained) == options  # stable once resolved
    first = resolve_options("idpt", {"layer": 0, "keep_prompt": False}, pretrained)
    assert first["blocks"] == ["blocks.blocks.0"]
    with pytest.raises(ValueError, match="keep_prompt=True needs the last block"):
        apply_adapter(backbone, "idpt", layer=0)
    with pytest.raises(ValueError, match="layer=5 is out of range for the model's 2 blocks"):
        apply_adapter(backbone, "idpt", layer=5)
    apply_adapter(backbone, "idpt", layer=0, keep_prompt=False)
    assert type(backbone.blocks.blocks[0]).__name__ == "IDPTBlock"
    assert type(backbone.blocks.blocks[1]).__name__ == "Block"


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
    if method == "pointgst":  # needs 3D patch centres
        with pytest.raises(ValueError, match=r"an image ViT\) cannot take pointgst"):
            apply_adapter(vit, method, **options)
        return
    apply_adapter(vit, method, **options)
    out = vit(images)
    assert out.shape == reference.shape
    assert torch.equal(out, reference) is (case in IDENTITY_AT_INIT)
    nudge(vit)
    F.cross_entropy(vit.train()(images), torch.tensor([1, 2])).backward()
    assert all(p.grad is not None for p in vit.parameters() if p.requires_grad)


@pytest.mark.parametrize("case", CASES)
def test_part_segmentation_takes_every_case(case):
    """No cls token there: PointGST finds the patches from the centres, IDPT is told."""
    method, options, _ = CASES[case]
    torch.manual_seed(0)
    model = PointMAEPartSeg(num_group=16, group_size=8, depth=2, trans_dim=D, encoder_dims=D,
                            num_heads=2).eval()
    points, category = torch.rand(2, 64, 3), torch.tensor([0, 1])
    reference = model(points, category)
    apply_adapter(model, method, **options, **({"skip_tokens": 0} if method == "idpt" else {}))
    out = model(points, category)
    assert out.shape == reference.shape
    assert torch.equal(out, reference) is (case in IDENTITY_AT_INIT)
    nudge(model)
    model.train()(points, category).square().mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


# --- the published Point-MAE numbers (PointGST's table, ScanObjectNN setting) -------------

# method -> (trainable parameters with head, GFLOPs in the module convention)
PUBLISHED = {"idpt": (1.7e6, 7.10), "dapt": (1.1e6, 4.96), "pointgst": (0.6e6, 4.81)}
# The public IDPT and DAPT heads take 1152 inputs (+384 x 256 weights); DAPT also
# scale-shifts the mini-PointNet output and the final norm (2 x 2 x 384): docs/methods.md.
HEAD_DIFFERENCE = {"idpt": 384 * 256, "dapt": 384 * 256 + 4 * 384, "pointgst": 0}


@pytest.mark.parametrize("method", PUBLISHED)
def test_published_parameters_and_gflops(method):
    torch.manual_seed(0)
    model = apply_adapter(PointMAE(cls_dim=15, num_group=128, group_size=32).eval(), method)
    params, gflops = PUBLISHED[method]
    counted = parameter_report(model)["trainable"] + HEAD_DIFFERENCE[method]
    assert counted == pytest.approx(params, rel=0.05)
    with official_graph(model):
        macs = module_macs(model, sample_points(2048))
    assert macs / 1e9 == pytest.approx(gflops, rel=0.01)
