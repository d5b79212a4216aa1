"""Backbones: sizes, the official forward pass, attention, grouping, frozen encoder, builder,
and the registry (a backbone added from this file alone, loaded and trained one step)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from official_forward import conv1d_encoder, explicit_attention, official_block, randomise
from torch import nn

from pointclora.models import (
    BACKBONES,
    HEAD_PREFIX,
    CheckpointError,
    CheckpointSpec,
    Layout,
    PointBERT,
    PointMAE,
    build_model,
    load_pretrained,
    register_backbone,
)
from pointclora.models.layers import Attention
from pointclora.models.pointnet import MiniPointNet

SMALL = dict(num_group=16, group_size=8, depth=2)  # official widths, fast to run


def small(cls, **kw):
    """Two blocks, a narrow trunk (96) and few patches: the official wiring, quickly."""
    torch.manual_seed(0)
    kw = {"cls_dim": 5, "trans_dim": 96, **SMALL, **kw}
    if cls is PointMAE:
        kw.setdefault("encoder_dims", kw["trans_dim"])
    return cls(**kw)


def full_size(cls, **kw):
    """Full-size model on the meta device: shapes and counts without allocating weights."""
    with torch.device("meta"):
        return cls(**kw)


def cloud(batch=2, n=128, seed=1):
    return torch.randn(batch, n, 3, generator=torch.Generator().manual_seed(seed))


def n_params(module):
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------- sizes


@pytest.mark.parametrize("cls, cls_dim, expected", [
    (PointMAE, 40, 22_099_752), (PointMAE, 15, 22_093_327),
    (PointBERT, 40, 22_065_960), (PointBERT, 15, 22_059_535),
])
def test_exact_parameter_counts(cls, cls_dim, expected):
    model = full_size(cls, cls_dim=cls_dim)
    assert n_params(model) == expected
    assert all(p.requires_grad for p in model.parameters())


def test_point_mae_parts():
    model = full_size(PointMAE, cls_dim=40)
    parts = {name: n_params(getattr(model, name))
             for name in ("encoder", "blocks", "pos_embed", HEAD_PREFIX, "norm")}
    assert parts == {"encoder": 494_464, "blocks": 21_279_744, "pos_embed": 50_048,
                     HEAD_PREFIX: 273_960, "norm": 768}
    assert model.cls_token.numel() + model.cls_pos.numel() == 768


# ---------------------------------------------------------------- reference forward


def reference_forward(model, points):
    """The official fine-tune forward written out with the model's weights (eval mode)."""
    neighborhood, center = model.group(points)
    tokens = conv1d_encoder(model.encoder, neighborhood)
    if isinstance(model, PointBERT):
        tokens = tokens @ model.reduce_dim.weight.T + model.reduce_dim.bias
    B, _, C = tokens.shape
    pe = model.pos_embed
    pos = F.gelu(center @ pe[0].weight.T + pe[0].bias) @ pe[2].weight.T + pe[2].bias
    x = torch.cat([model.cls_token.expand(B, -1, -1), tokens], 1)
    pos = torch.cat([model.cls_pos.expand(B, -1, -1), pos], 1)
    for blk in model.blocks.blocks:
        x = official_block(blk, x + pos)
    x = F.layer_norm(x, (C,), model.norm.weight, model.norm.bias, eps=1e-5)
    return getattr(model, HEAD_PREFIX)(torch.cat([x[:, 0], x[:, 1:].max(1)[0]], dim=-1))


@pytest.mark.parametrize("cls", [PointMAE, PointBERT])
def test_forward_matches_official_formula(cls):
    model = randomise(small(cls)).eval()
    points = cloud()
    with torch.no_grad():
        out = model(points)
        ref = reference_forward(model, points)
    assert out.shape == (2, 5)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_attention_matches_explicit_softmax():
    torch.manual_seed(0)
    attn = Attention(48, num_heads=6)
    nn.init.normal_(attn.proj.bias)
    x = torch.randn(3, 17, 48)
    torch.testing.assert_close(attn(x), explicit_attention(attn, x), rtol=1e-5, atol=1e-6)
    assert attn.qkv.bias is None
    assert Attention(384, num_heads=6).scale == 64**-0.5


class Counting(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x):
        self.calls += 1
        return self.inner(x)


def test_attention_calls_qkv_and_proj_as_modules():
    model = small(PointMAE).eval()
    points = cloud()
    with torch.no_grad():
        before = model(points)
        attn = model.blocks.blocks[1].attn
        attn.qkv, attn.proj = Counting(attn.qkv), Counting(attn.proj)
        after = model(points)
    assert (attn.qkv.calls, attn.proj.calls) == (1, 1)
    torch.testing.assert_close(after, before, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_mini_pointnet_matches_conv1d(mode):
    torch.manual_seed(0)
    ours = randomise(MiniPointNet(384))
    ref = copy.deepcopy(ours)
    getattr(ours, mode)()
    getattr(ref, mode)()
    nb = torch.randn(2, 16, 32, 3)
    weights = torch.randn(2, 16, 384)
    out, expected = ours(nb), conv1d_encoder(ref, nb)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    (out * weights).sum().backward()
    (expected * weights).sum().backward()
    for (name, a), b in zip(ours.state_dict().items(), ref.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)  # BN running stats
    # Gradients reach several hundred; the biases before a BatchNorm get ~0 (BN removes them).
    for (name, a), b in zip(ours.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-3, msg=name)


# ---------------------------------------------------------------- official details


def test_layer_norms_drop_path_and_init():
    torch.manual_seed(0)
    model = PointMAE(trans_dim=48, encoder_dims=48, num_heads=6, depth=12)
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    assert len(norms) == 2 * 12 + 1 and all(m.eps == 1e-5 for m in norms)
    rates = [getattr(b.drop_path, "drop_prob", 0.0) for b in model.blocks.blocks]
    assert rates == pytest.approx(torch.linspace(0, 0.1, 12).tolist())
    assert isinstance(model.blocks.blocks[0].drop_path, nn.Identity)

    tokens = torch.cat([model.cls_token.flatten(), model.cls_pos.flatten()])
    assert 0.015 < tokens.std().item() < 0.025 and tokens.abs().max() <= 2
    big = PointMAE(depth=1)
    for name, m in big.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv1d)):
            assert m.bias is None or torch.all(m.bias == 0), name
            if m.weight.numel() >= 10_000:
                assert m.weight.std().item() == pytest.approx(0.02, rel=0.05), name
        elif isinstance(m, nn.LayerNorm):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0), name


# ---------------------------------------------------------------- grouping


def test_group_brute_force():
    model = small(PointMAE)
    points = cloud(batch=3, n=100)
    points.requires_grad_(True)
    neighborhood, center = model.group(points)
    assert neighborhood.shape == (3, 16, 8, 3) and center.shape == (3, 16, 3)
    assert not neighborhood.requires_grad and not center.requires_grad
    pts = points.detach()
    torch.testing.assert_close(center[:, 0], pts[:, 0])  # FPS starts at index 0
    d_center = (center.unsqueeze(2) - pts.unsqueeze(1)).norm(dim=-1)  # (B, G, N)
    assert torch.all(d_center.min(-1).values < 1e-5), "centres are input points"
    assert len({tuple(c.tolist()) for c in center[0]}) == 16, "centres are distinct"
    torch.testing.assert_close(neighborhood[:, :, 0], torch.zeros(3, 16, 3))  # centre first
    absolute = neighborhood + center.unsqueeze(2)
    expected = d_center.topk(8, dim=-1, largest=False).indices
    found = (absolute.reshape(3, -1, 1, 3) - pts.unsqueeze(1)).norm(dim=-1).argmin(-1)
    found = found.reshape(3, 16, 8)
    assert torch.equal(found.sort(-1).values, expected.sort(-1).values)
    dist = (absolute - center.unsqueeze(2)).norm(dim=-1)
    assert torch.all(dist[..., 1:] >= dist[..., :-1] - 1e-6), "sorted by distance"


@pytest.mark.parametrize("bad, match", [
    (torch.randn(2, 128, 6), r"\(B, N, 3\)"),
    (torch.randn(128, 3), r"\(B, N, 3\)"),
    (torch.randint(0, 5, (2, 128, 3)), "float"),
    (torch.randn(2, 10, 3), "fewer than num_group=16"),
])
def test_bad_points_are_rejected(bad, match):
    with pytest.raises(ValueError, match=match):
        small(PointMAE)(bad)


# ---------------------------------------------------------------- frozen encoder, determinism


@pytest.mark.parametrize("cls", [PointMAE, PointBERT])
def test_frozen_encoder_runs_without_autograd_and_gives_same_output(cls):
    model = randomise(small(cls)).train()
    frozen = copy.deepcopy(model)
    frozen.encoder.requires_grad_(False)
    grad_mode = {}
    for name, m in (("trained", model), ("frozen", frozen)):
        m.encoder.register_forward_hook(
            lambda mod, inp, out, name=name: grad_mode.__setitem__(name, torch.is_grad_enabled()))
    points = cloud()
    torch.manual_seed(5)
    out = model(points)
    torch.manual_seed(5)
    out_frozen = frozen(points)
    assert grad_mode == {"trained": True, "frozen": False}
    assert torch.equal(out, out_frozen)
    out_frozen.sum().backward()
    assert all(p.grad is None for p in frozen.encoder.parameters())
    assert frozen.cls_token.grad is not None and frozen.blocks.blocks[0].attn.qkv.weight.grad \
        is not None


@pytest.mark.parametrize("cls", [PointMAE, PointBERT])
def test_backward_reaches_every_parameter(cls):
    model = small(cls).train()
    F.cross_entropy(model(cloud(batch=4)), torch.tensor([0, 1, 2, 3])).backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


@pytest.mark.parametrize("cls", [PointMAE, PointBERT])
def test_eval_is_deterministic_and_per_sample(cls):
    model = randomise(small(cls)).eval()
    points = cloud(batch=3)
    with torch.no_grad():
        first, second = model(points), model(points)
        alone = model(points[1:2])
    assert torch.equal(first, second)
    torch.testing.assert_close(alone, first[1:2], rtol=1e-4, atol=1e-5)
    model.train()
    torch.manual_seed(0)
    assert not torch.equal(model(points), first), "dropout / drop-path active in train mode"


# ---------------------------------------------------------------- configuration


def test_build_model():
    model = build_model({"name": "point_bert", "cls_dim": 15, **SMALL, "pretrained": None})
    assert n_params(model) == 22_059_535 - 10 * 1_773_312  # ten fewer blocks
    assert isinstance(model, PointBERT)
    assert model.config == dict(cls_dim=15, trans_dim=384, num_heads=6, encoder_dims=256,
                                drop_path_rate=0.1, **SMALL)
    assert model.reduce_dim.weight.shape == (384, 256)
    assert isinstance(build_model({"name": "point_mae", **SMALL}), PointMAE)


@pytest.mark.parametrize("cfg, match", [
    ({"name": "pointnet"}, r"one of \[.*'point_bert'.*'point_mae'.*\], got 'pointnet'"),
    ({"cls_dim": 3}, "model.name must be one of"),
    ({"name": "point_mae", "dropout": 0.1}, r"\['dropout'\].*'drop_path_rate'"),
    ({"name": "point_mae", "num_heads": 5}, "divisible by num_heads=5"),
    ({"name": "point_mae", "encoder_dims": 256}, "must equal trans_dim"),
    ({"name": "point_mae", "depth": 0}, "depth must be a positive integer"),
    ({"name": "point_mae", "drop_path_rate": 1.5}, r"drop_path_rate must be a number in \[0, 1\)"),
    ({"name": "point_bert", "cls_dim": "40"}, "cls_dim must be a positive integer"),
])
def test_build_model_rejects_bad_config(cfg, match):
    with pytest.raises(ValueError, match=match):
        build_model(cfg)


# ---------------------------------------------------------------- registry: a backbone in one file


class ToyBlock(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc = nn.Linear(width, width)

    def forward(self, x):
        return x + F.gelu(self.fc(self.norm(x)))


class ToyNet(nn.Module):
    """A per-point residual MLP, max-pooled, with a linear head: a stand-in for a new backbone.

    Its pre-training files keep the encoder under ``student.`` with blocks called ``layers``,
    beside a ``student.predictor`` and a ``teacher`` that fine-tuning does not use.
    """

    checkpoint = CheckpointSpec(
        title="ToyNet",
        layouts=(
            Layout("ToyNet pre-training checkpoint", marks=("student.layers.",), prefix="student.",
                   renames=((r"^layers\.(\d+)\.", r"blocks.\1."),), dropped=("predictor.",)),
            Layout("ToyNet fine-tuned checkpoint", marks=("embed.", "blocks.0.fc.")),
        ),
        head=("head",), classes=("num_classes", "head.weight"),
        shapes={"width": "embed.weight"}, counts={"depth": r"blocks\.(\d+)\."},
        weights_hint="ToyNet files are written by this test",
    )
    adapter_defaults = {"target_modules": ["fc"], "blocks": r"blocks\.\d+", "head": ["head"],
                        "tokens": ["offset"]}

    def __init__(self, num_classes=3, width=8, depth=2):
        super().__init__()
        self.config = dict(num_classes=num_classes, width=width, depth=depth)
        self.embed = nn.Linear(3, width)
        self.offset = nn.Parameter(torch.zeros(1, 1, width))  # a learned token
        self.blocks = nn.ModuleList(ToyBlock(width) for _ in range(depth))
        self.head = nn.Linear(width, num_classes)

    def forward(self, points):
        x = self.embed(points) + self.offset
        for block in self.blocks:
            x = block(x)
        return self.head(x.amax(dim=1))


@pytest.fixture
def toy():
    """ToyNet registered as ``toy`` for one test (the registry is left as it was)."""
    assert "toy" not in BACKBONES
    register_backbone("toy")(ToyNet)
    yield ToyNet
    del BACKBONES["toy"]


def toy_pretrain_file(path, depth=2, width=8, seed=0):
    """A ToyNet pre-training file in its own layout, from an independently seeded model."""
    torch.manual_seed(seed)
    source = ToyNet(width=width, depth=depth).state_dict()
    state = {f"student.{k.replace('blocks.', 'layers.')}": v for k, v in source.items()
             if not k.startswith("head.")}
    state["student.predictor.weight"] = torch.randn(4, width)
    state["teacher.embed.weight"] = torch.randn(width, 3)
    torch.save({"model": state, "epoch": 100}, path)
    return source


def test_a_backbone_added_from_one_file_loads_its_own_layout_and_trains(toy, tmp_path, caplog):
    from pointclora.adapters import apply_adapter

    path = tmp_path / "toy_pretrain.pth"
    source = toy_pretrain_file(path)
    torch.manual_seed(1)
    with caplog.at_level("INFO", logger="pointclora"):
        model = build_model({"name": "toy", "num_classes": 3, "pretrained": str(path)})
    assert isinstance(model, ToyNet)
    state = model.state_dict()
    for key, value in source.items():  # renamed keys landed in place; the head kept its init
        assert torch.equal(state[key], value) != key.startswith("head."), key
    report = str(next(r.getMessage() for r in caplog.records if "Loaded" in r.getMessage()))
    n = len(source)
    assert f"Loaded {n - 2}/{n} model tensors from {path} (ToyNet pre-training" in report
    assert "expected missing (kept at init): head.* (2)" in report
    assert "student.predictor.weight" in report and "teacher.embed.weight" in report

    # Train with an adapter: only the adapters, the token and the head move (two steps: LoRA's
    # B starts at zero, so A only gets a gradient from the second step on).
    apply_adapter(model, "lora", r=2)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(".fc." in n or n.startswith("head.") for n in trainable - {"offset"})
    assert "offset" in trainable and {"head.weight", "head.bias"} <= trainable
    assert any(".fc." in n for n in trainable) and "blocks.0.fc.weight" not in trainable
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):
        optimizer.zero_grad()
        F.cross_entropy(model(cloud(4, 32)), torch.tensor([0, 1, 2, 0])).backward()
        optimizer.step()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved == trainable


def test_a_registered_backbone_takes_part_in_telling_files_apart(toy, tmp_path):
    path = tmp_path / "toy_pretrain.pth"
    toy_pretrain_file(path, depth=3)
    with pytest.raises(CheckpointError, match=(
            r"toy_pretrain\.pth \(ToyNet pre-training checkpoint\) does not match ToyNet: "
            r"unexpected 4 key\(s\): student\.layers\.2\.norm\.weight.*depth=3 \(model: 2\)")):
        build_model({"name": "toy", "pretrained": str(path)})
    wide = tmp_path / "wide.pth"
    toy_pretrain_file(wide, width=6)
    with pytest.raises(CheckpointError, match=r"shape mismatch .* width=6 \(model: 8\)"):
        build_model({"name": "toy", "pretrained": str(wide)})
    # The Point-MAE loader knows the new layout through the registry, and the reverse.
    with pytest.raises(CheckpointError, match=(
            r"this is a ToyNet checkpoint \(keys of a ToyNet pre-training checkpoint\) but the "
            r"model is PointMAE; build the model with name: toy")):
        small(PointMAE).load_pretrained(path)
    mae = tmp_path / "mae.pth"
    torch.save({"base_model": small(PointMAE).state_dict()}, mae)
    with pytest.raises(CheckpointError, match=r"this is a Point-MAE checkpoint .* name: point_mae"):
        build_model({"name": "toy", "pretrained": str(mae)})


def test_registry_refuses_a_name_taken_by_another_class():
    with pytest.raises(ValueError, match=r"'point_mae' is already registered by .*PointMAE"):
        register_backbone("point_mae")(ToyNet)
    assert register_backbone("point_mae")(PointMAE) is PointMAE  # re-registering is harmless
    assert BACKBONES["point_mae"] is PointMAE


def test_a_factory_function_registers_with_its_checkpoint_spec(tmp_path):
    """Stock models (a timm ViT) are built by functions: the spec rides on the function."""

    class Bare(ToyNet):
        checkpoint = None

    def bare_toy(width=8, depth=2):
        return Bare(width=width, depth=depth)

    bare_toy.checkpoint = ToyNet.checkpoint
    path = tmp_path / "toy_pretrain.pth"
    source = toy_pretrain_file(path)
    with pytest.raises(TypeError, match="Bare declares no checkpoint layouts"):
        load_pretrained(Bare(), path)
    register_backbone("bare_toy")(bare_toy)
    try:
        model = build_model({"name": "bare_toy", "pretrained": str(path)})
    finally:
        del BACKBONES["bare_toy"]
    assert torch.equal(model.blocks[1].fc.weight, source["blocks.1.fc.weight"])
