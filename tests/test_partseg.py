"""Part segmentation model: official keys and sizes, the official forward written out,
checkpoints (pretrain and fine-tuned files), adapters."""
import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from official_forward import conv1d_encoder, official_block, randomise
from torch import nn

from pointclora.models.partseg import FeaturePropagation, PointBERTPartSeg, PointMAEPartSeg

FIXTURES = Path(__file__).parent / "fixtures"
SMALL = dict(num_group=16, group_size=8, depth=3, trans_dim=48, num_heads=6)


def small(cls, **kw):
    torch.manual_seed(0)
    kw = {**SMALL, **kw}
    if cls is PointMAEPartSeg:
        kw.setdefault("encoder_dims", kw["trans_dim"])
    return cls(**kw)


def cloud(batch=2, n=96, seed=1):
    return torch.randn(batch, n, 3, generator=torch.Generator().manual_seed(seed))


def categories(batch=2, seed=2):
    return torch.randint(0, 16, (batch,), generator=torch.Generator().manual_seed(seed))


def read_key_list(name):
    rows = [line.rstrip("\n").split("\t") for line in (FIXTURES / name).read_text().splitlines()
            if line and not line.startswith("#")]
    return [(key, [int(d) for d in shape.strip("[]").split(",") if d.strip()], dtype)
            for key, shape, dtype in rows]


# ---------------------------------------------------------------- keys and sizes


def test_state_dict_is_the_official_one():
    with torch.device("meta"):
        model = PointMAEPartSeg(num_parts=50)
    ours = [(k, list(v.shape), str(v.dtype).removeprefix("torch."))
            for k, v in model.state_dict().items()]
    assert ours == read_key_list("point_mae_partseg.tsv")  # names, order, shapes, dtypes
    assert sum(p.numel() for p in model.parameters()) == 27_063_730
    assert model.fetch_blocks == (3, 7, 11)


def test_point_bert_variant_keys():
    with torch.device("meta"):
        mae, bert = PointMAEPartSeg(), PointBERTPartSeg()
    mae_keys, bert_keys = list(mae.state_dict()), list(bert.state_dict())
    n = sum(k.startswith("encoder.") for k in mae_keys)  # mini-PointNet first
    assert bert_keys[:n] == mae_keys[:n]
    assert bert_keys[n:n + 2] == ["reduce_dim.weight", "reduce_dim.bias"]
    assert bert_keys[n + 2:] == mae_keys[n:]
    assert bert.encoder.out_dims == 256 and bert.reduce_dim.weight.shape == (384, 256)


# ---------------------------------------------------------------- the official forward


def official_propagation(fp, xyz1, xyz2, points2):
    """``PointNetFeaturePropagation`` with ``points1 = xyz``: sort all centre distances,
    first 3, weights 1/(d^2 + 1e-8), [xyz, interpolated] -> Conv1d-BN-ReLU layers."""
    B, N, _ = xyz1.shape
    dists = ((xyz1[:, :, None] - xyz2[:, None]) ** 2).sum(-1)  # (B, N, G)
    dists, idx = dists.sort(dim=-1)
    dists, idx = dists[:, :, :3], idx[:, :, :3]
    recip = 1.0 / (dists + 1e-8)
    weight = recip / recip.sum(dim=2, keepdim=True)
    batch = torch.arange(B).view(B, 1, 1).expand_as(idx)
    interpolated = (points2[batch, idx] * weight.view(B, N, 3, 1)).sum(dim=2)
    new_points = torch.cat([xyz1, interpolated], dim=-1).permute(0, 2, 1)
    for conv, bn in zip(fp.mlp_convs, fp.mlp_bns, strict=True):
        new_points = F.relu(bn(conv(new_points)))
    return new_points


def reference_forward(model, points, one_hot):
    """``segmentation/models/pt.py: get_model.forward`` written out with the model's weights."""
    B, N, _ = points.shape
    neighborhood, center = model.group(points)
    x = conv1d_encoder(model.encoder, neighborhood)
    if isinstance(model, PointBERTPartSeg):
        x = x @ model.reduce_dim.weight.T + model.reduce_dim.bias
    C = x.shape[-1]
    pe = model.pos_embed
    pos = F.gelu(center @ pe[0].weight.T + pe[0].bias) @ pe[2].weight.T + pe[2].bias
    feature_list = []
    for i, blk in enumerate(model.blocks.blocks):
        x = official_block(blk, x + pos)
        if i in model.fetch_blocks:
            feature_list.append(x)
    feature_list = [F.layer_norm(f, (C,), model.norm.weight, model.norm.bias, eps=1e-5)
                    .transpose(-1, -2) for f in feature_list]
    x = torch.cat(feature_list, dim=1)  # (B, 3C, G)
    x_max = torch.max(x, 2)[0].view(B, -1).unsqueeze(-1).repeat(1, 1, N)
    x_avg = torch.mean(x, 2).view(B, -1).unsqueeze(-1).repeat(1, 1, N)
    label = model.label_conv(one_hot.view(B, 16, 1)).repeat(1, 1, N)
    x_global = torch.cat((x_max, x_avg, label), 1)
    f_level_0 = official_propagation(model.propagation_0, points, center, x.transpose(1, 2))
    x = torch.cat((f_level_0, x_global), 1)
    x = F.relu(model.bns1(model.convs1(x)))
    x = model.dp1(x)
    x = F.relu(model.bns2(model.convs2(x)))
    x = F.log_softmax(model.convs3(x), dim=1)
    return x.permute(0, 2, 1)


@pytest.mark.parametrize("cls", [PointMAEPartSeg, PointBERTPartSeg])
def test_forward_matches_official_formula(cls):
    model = randomise(small(cls)).eval()
    points, cat = cloud(), categories()
    one_hot = F.one_hot(cat, 16).float()
    with torch.no_grad():
        out = model(points, cat)
        ref = reference_forward(model, points, one_hot)
        assert out.shape == (2, 96, 50)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
        # the official loop passes one-hot (B, 1, 16); (B, 16) and ids give the same output
        torch.testing.assert_close(model(points, one_hot.unsqueeze(1)), out, rtol=0, atol=0)
        torch.testing.assert_close(model(points, one_hot), out, rtol=0, atol=0)
    torch.testing.assert_close(out.exp().sum(-1), torch.ones(2, 96))


def test_training_mode_matches_official_batch_statistics():
    """BatchNorm on batch statistics (train mode): same output, same running buffers."""
    model = randomise(small(PointMAEPartSeg, drop_path_rate=0.0)).train()
    model.dp1.p = 0.0
    ref = copy.deepcopy(model)
    points, cat = cloud(batch=3), categories(batch=3)
    out = model(points, cat)
    expected = reference_forward(ref, points, F.one_hot(cat, 16).float())
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    for (name, a), b in zip(model.state_dict().items(), ref.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    weights = torch.randn_like(out)
    (out * weights).sum().backward()
    (expected * weights).sum().backward()
    # biases just before a BatchNorm get ~0 (BN removes them): rounding noise of about 1e-3
    for (name, a), b in zip(model.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-3, atol=5e-3, msg=name)


def test_official_fetch_blocks_and_propagation_weights():
    assert PointMAEPartSeg(depth=3, trans_dim=48, encoder_dims=48).fetch_blocks == (0, 1, 2)
    # a point on a centre takes that centre's feature; weights sum to 1 and favour near centres
    points = torch.tensor([[[0.0, 0, 0], [1, 0, 0], [0.2, 0, 0], [0, 2, 0]]])
    center = points[:, :3]
    idx, w = FeaturePropagation.weights(points, center)
    d2 = ((points[0, :, None] - center[0, None]) ** 2).sum(-1)
    expected_idx = d2.sort(-1).indices[:, :3]
    assert torch.equal(idx[0], expected_idx)
    recip = 1 / (d2.gather(1, expected_idx) + 1e-8)
    torch.testing.assert_close(w[0], recip / recip.sum(-1, keepdim=True))
    assert w[0, 0, 0] > 0.999999


def test_official_graph_is_the_same_function_and_counts_as_the_official_code():
    """``official_forward`` (what FLOP counters count) equals ``forward``, and its module
    multiply-accumulates equal those of the official code (benchmarks/reference_partseg.py)."""
    import sys

    from pointclora.analysis.flops import module_macs, official_graph

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from reference_partseg import ReferencePartSeg

    model = randomise(small(PointMAEPartSeg)).eval()
    ref = ReferencePartSeg(**{**SMALL, "encoder_dims": 48}).eval()
    ref.load_state_dict(model.state_dict())
    points, cat = cloud(), categories()
    with torch.no_grad():
        torch.testing.assert_close(model.official_forward(points, cat), model(points, cat),
                                   rtol=1e-4, atol=1e-4)
        with official_graph(model):
            ours = module_macs(model, (points, cat))
        executed = module_macs(model, (points, cat))
        official = module_macs(ref, (points.transpose(1, 2),
                                     F.one_hot(cat, 16).float().unsqueeze(1)))
    assert ours == official and executed < official


def test_backward_reaches_every_parameter():
    model = small(PointMAEPartSeg).train()
    out = model(cloud(batch=3), categories(batch=3))
    F.nll_loss(out.reshape(-1, 50), torch.randint(0, 50, (3 * 96,))).backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


@pytest.mark.parametrize("bad, match", [
    (torch.tensor([0, 16]), r"\[0, 16\)"),
    (torch.tensor([[0, 1]]), r"shape \(2,\)"),
    (torch.zeros(2, 15), r"\(2, 16\)"),
])
def test_bad_category_is_rejected(bad, match):
    with pytest.raises(ValueError, match=match):
        small(PointMAEPartSeg)(cloud(), bad)


@pytest.mark.parametrize("kw, match", [
    ({"fetch_blocks": (0, 1, 5)}, "fetch_blocks"),
    ({"num_group": 2}, "num_group must be >= 3"),
    ({"num_parts": 0}, "num_parts must be a positive integer"),
])
def test_bad_config_is_rejected(kw, match):
    with pytest.raises(ValueError, match=match):
        small(PointMAEPartSeg, **kw)


# ---------------------------------------------------------------- checkpoints


def trunk_keys(model):
    return [k for k in model.state_dict() if k.split(".")[0] in (
        "encoder", "reduce_dim", "pos_embed", "blocks", "norm")]


def test_official_pretrain_file_loads_into_the_encoder(tmp_path):
    source = randomise(small(PointMAEPartSeg), seed=7)
    trunk = trunk_keys(source)
    state = {f"module.MAE_encoder.{k}": source.state_dict()[k] for k in trunk}
    state["module.mask_token"] = torch.zeros(1, 1, 48)
    state["module.MAE_decoder.norm.weight"] = torch.ones(48)
    path = tmp_path / "pretrain.pth"
    torch.save({"base_model": state, "epoch": 300}, path)

    model = small(PointMAEPartSeg)
    head_before = {k: v.clone() for k, v in model.state_dict().items() if k not in trunk}
    report = model.load_pretrained(path)
    assert report.loaded == trunk
    assert sorted(report.expected_missing) == sorted(head_before)
    assert report.missing == [] and report.unexpected == []
    assert sorted(report.ignored) == ["module.MAE_decoder.norm.weight", "module.mask_token"] or \
        sorted(report.ignored) == ["MAE_decoder.norm.weight", "mask_token"]
    for k in trunk:
        assert torch.equal(model.state_dict()[k], source.state_dict()[k]), k
    for k, v in head_before.items():
        assert torch.equal(model.state_dict()[k], v), k


def test_official_finetuned_file_loads_key_for_key(tmp_path):
    source = randomise(small(PointMAEPartSeg), seed=8).eval()
    path = tmp_path / "best_model.pth"
    # main.py saves {'epoch', 'train_acc', ..., 'model_state_dict', 'optimizer_state_dict'}
    torch.save({"epoch": 250, "class_avg_iou": 0.84, "inctance_avg_iou": 0.86,
                "model_state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}},
               path)
    model = small(PointMAEPartSeg)
    report = model.load_pretrained(path)
    assert report.loaded == list(model.state_dict())
    assert report.missing == report.expected_missing == report.unexpected == []
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(cloud(), categories()), source(cloud(), categories()))


def test_classification_file_is_refused_with_the_right_model_name(tmp_path):
    from pointclora.models import CheckpointError, PointMAE

    path = tmp_path / "modelnet_1k.pth"
    torch.save({"base_model": PointMAE(cls_dim=5, **SMALL, encoder_dims=48).state_dict()}, path)
    with pytest.raises(CheckpointError, match="name: point_mae"):
        small(PointMAEPartSeg).load_pretrained(path)


def test_point_bert_pretrain_file_loads_into_its_segmentation_model(tmp_path):
    source = randomise(small(PointBERTPartSeg), seed=9)
    trunk = trunk_keys(source)
    state = {f"transformer_q.{k}": source.state_dict()[k] for k in trunk}
    state.update({"transformer_q.cls_token": torch.zeros(1, 1, 48),
                  "transformer_q.cls_pos": torch.zeros(1, 1, 48),
                  "transformer_q.mask_token": torch.zeros(1, 1, 48),
                  "transformer_k.norm.weight": torch.ones(48), "queue": torch.zeros(4, 8)})
    path = tmp_path / "Point-BERT.pth"
    torch.save({"base_model": state}, path)
    model = small(PointBERTPartSeg)
    report = model.load_pretrained(path)
    assert report.loaded == trunk and report.missing == report.unexpected == []
    assert "transformer_q.cls_token" in report.ignored
    assert torch.equal(model.reduce_dim.weight, source.reduce_dim.weight)


@pytest.mark.parametrize("backbone, cls, name", [
    ("point_mae", PointMAEPartSeg, "point_mae_partseg"),
    ("point_bert", PointBERTPartSeg, "point_bert_partseg"),
])
def test_backbone_option_selects_the_encoder(backbone, cls, name):
    """``name: partseg, backbone: ...`` builds the same model, key for key and weight for
    weight, as the encoder's own model name; encoder_dims null is that encoder's width."""
    from pointclora.models import build_model

    options = {**SMALL, "encoder_dims": None}
    torch.manual_seed(0)
    model = build_model({"name": "partseg", "backbone": backbone, **options})
    torch.manual_seed(0)
    width = 48 if backbone == "point_mae" else 256  # trans_dim, or Point-BERT's own
    named = build_model({"name": name, **SMALL, "encoder_dims": width})
    assert type(model) is cls and model.encoder.out_dims == width
    ours, theirs = model.state_dict(), named.state_dict()
    assert list(ours) == list(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_backbone_option_loads_its_encoder_file_and_rejects_unknown_encoders(tmp_path):
    from pointclora.config import load_config
    from pointclora.models import build_model

    source = randomise(small(PointBERTPartSeg), seed=10)
    path = tmp_path / "bert_partseg.pth"
    torch.save({"base_model": source.state_dict()}, path)  # a fine-tuned segmentation file
    model = build_model({"name": "partseg", "backbone": "point_bert", **SMALL,
                         "pretrained": str(path)})
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match=r"model.backbone must be one of \['point_bert', "
                                         r"'point_mae'\].*'pointnet'"):
        build_model({"name": "partseg", "backbone": "pointnet", **SMALL})
    recipe = Path(__file__).parents[1] / "configs/shapenetpart/partseg_point_bert.yaml"
    assert load_config(recipe)["model"]["backbone"] == "point_bert"
    with pytest.raises(ValueError, match="model.backbone must be a string"):
        load_config(recipe, ["model.backbone=3"])


# ---------------------------------------------------------------- adapters


@pytest.mark.parametrize("method", ["lora", "clora", "serial_lora", "aoft", "linear", "full"])
def test_every_adapter_method_applies_and_merges_to_official_keys(method):
    from pointclora.adapters import apply_adapter, merge_adapter

    model = randomise(small(PointMAEPartSeg)).eval()
    keys = list(model.state_dict())
    points, cat = cloud(), categories()
    with torch.no_grad():
        before = model(points, cat)
    apply_adapter(model, method)
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    head = {"label_conv", "propagation_0", "convs1", "convs2", "convs3", "bns1", "bns2"}
    assert head <= trainable
    if method not in ("full", "linear"):
        assert any(".attn." in n and p.requires_grad for n, p in model.named_parameters())
        assert not model.encoder.first_conv[0].weight.requires_grad
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(points, cat), before, rtol=1e-5, atol=1e-5)
    # one step moves the adapters, then merging gives back the official keys and function
    model.train()
    out = model(points, cat)
    F.nll_loss(out.reshape(-1, 50), torch.randint(0, 50, (2 * 96,))).backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.add_(torch.randn_like(p) * 0.01)
    model.eval()
    with torch.no_grad():
        adapted = model(points, cat)
    merge_adapter(model)
    assert list(model.state_dict()) == keys
    with torch.no_grad():
        torch.testing.assert_close(model(points, cat), adapted, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method, options", [
    ("vpt_deep", {}), ("idpt", {"skip_tokens": 0}), ("dapt", {}),
    ("pointgst", {}), ("adapter", {}),
])
def test_prompt_and_bottleneck_methods_train_the_segmentation_model(method, options):
    """No cls token here: IDPT takes skip_tokens=0 (PointGST finds the patches itself); prompts kept
    after the last block are not patches and are left out of the propagated features."""
    from pointclora.adapters import apply_adapter

    model = small(PointMAEPartSeg)
    apply_adapter(model, method, **options)
    out = model.train()(cloud(), categories())
    assert out.shape == (2, 96, 50)
    out.sum().backward()
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all(model.get_parameter(n).grad is not None for n in trained)
    assert any(n.startswith("convs3") for n in trained)
    assert not model.encoder.first_conv[0].weight.requires_grad


def test_frozen_encoder_bn_stats_stay_and_head_bn_trains():
    from pointclora.adapters import apply_adapter

    model = small(PointMAEPartSeg)
    apply_adapter(model, "lora")
    model.train()
    assert not model.encoder.first_conv[1].training
    assert model.bns1.training and model.label_conv[1].training
    assert isinstance(model.propagation_0.mlp_bns[0], nn.BatchNorm1d)
    assert model.propagation_0.mlp_bns[0].training


# ---------------------------------------------------------------- benchmark baseline


def test_benchmark_baseline_computes_the_same_function():
    """benchmarks/reference_partseg.py (the official code) and ours: same keys and outputs
    (eval; train mode with drop-path under the same seed), gradients and BatchNorm statistics.

    Gradients are compared with BatchNorm on batch statistics and no drop-path, and with
    drop-path and BatchNorm on running statistics: both at once on 3 clouds amplify float
    rounding through the BatchNorm backward to ~0.3% of the largest gradients.
    """
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from reference_partseg import ReferencePartSeg

    points, cat = cloud(batch=3), categories(batch=3)
    one_hot = F.one_hot(cat, 16).float().unsqueeze(1)
    for drop_path, bn_train in ((0.0, True), (0.2, False)):
        ours = randomise(small(PointMAEPartSeg, drop_path_rate=drop_path))
        ref = ReferencePartSeg(**{**SMALL, "encoder_dims": 48, "drop_path_rate": drop_path})
        assert list(ref.state_dict()) == list(ours.state_dict())
        ref.load_state_dict(ours.state_dict())
        with torch.no_grad():
            torch.testing.assert_close(ours.eval()(points, cat),
                                       ref.eval()(points.transpose(1, 2), one_hot),
                                       rtol=1e-4, atol=1e-4)
        for model in (ours, ref):
            model.train()
            model.dp1.p = 0.0  # dropout masks are laid out differently (channels last)
            for m in model.modules():
                if isinstance(m, nn.BatchNorm1d):
                    m.train(bn_train)
        torch.manual_seed(4)
        out = ours(points, cat)
        torch.manual_seed(4)
        expected = ref(points.transpose(1, 2), one_hot)
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
        weights = torch.randn_like(out)
        (out * weights).sum().backward()
        (expected * weights).sum().backward()
        for (name, a), b in zip(ours.named_parameters(), ref.parameters(), strict=True):
            scale = b.grad.abs().max().item()  # pre-BN biases get ~0: rounding noise
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-3, atol=1e-4 * max(scale, 10),
                                       msg=name)
        for (name, a), b in zip(ours.state_dict().items(), ref.state_dict().values(),
                                strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
