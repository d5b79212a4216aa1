"""FLOP and parameter counting against the published figures and closed-form counts."""
import json
import runpy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pointclora.adapters import METHODS, apply_adapter, parameter_report
from pointclora.analysis import (
    build_adapted,
    complexity_report,
    fvcore_flops,
    module_macs,
    official_graph,
    sample_points,
)
from pointclora.config import load_config
from pointclora.models import PointMAE
from pointclora.ops import furthest_point_sample, knn

ROOT = Path(__file__).resolve().parents[1]
# REFERENCE section 1 and 7: Point-MAE on ScanObjectNN (2048 points, 128 x 32, 15 classes).
PUBLISHED_PARAMS = 22_093_327
PUBLISHED_GMACS = 4.776  # module (thop-style) convention behind the published "4.8"
PUBLISHED_FVCORE_GFLOPS = 4.93  # "about 4.93 G" with the attention matmuls


def closed_form(G=128, S=32, C=384, depth=12, heads=6, classes=15, enc=384):
    """Hand count of the official Point-MAE graph, one cloud."""
    P, L = G * S, G + 1
    conv = P * (3 * 128 + 128 * 256 + 512 * 512 + 512 * enc)
    bn_elems = P * (128 + 512)
    pos = G * (3 * 128 + 128 * C)
    blocks = depth * L * (C * 3 * C + C * C + 2 * C * 4 * C)
    head = 2 * C * 256 + 256 * 256 + 256 * classes
    ln_elems = (2 * depth + 1) * L * C
    head_bn_elems = 2 * 256
    attention = depth * 2 * heads * L * L * (C // heads)
    return {
        "conv": conv,
        "linear": pos + blocks + head,
        "attention": attention,
        # thop: 4 x numel for affine norms; fvcore: batch_norm (eval) 2x, layer_norm 5x
        "module_macs": conv + pos + blocks + head + 4 * (bn_elems + head_bn_elems + ln_elems),
        "fvcore_norms": 2 * (bn_elems + head_bn_elems) + 5 * ln_elems,
    }


@pytest.fixture(scope="module")
def scan_model():
    return PointMAE(cls_dim=15, num_group=128, group_size=32).eval()


@pytest.fixture(scope="module")
def scan_points():
    return sample_points(2048)


def test_scanobjectnn_point_mae_matches_published(scan_model, scan_points):
    params = sum(p.numel() for p in scan_model.parameters())
    assert params == PUBLISHED_PARAMS
    with official_graph(scan_model):
        macs = module_macs(scan_model, scan_points)
    assert macs == closed_form()["module_macs"]
    assert macs / 1e9 == pytest.approx(PUBLISHED_GMACS, rel=0.01)


def test_fvcore_counts_attention_and_explains_every_skipped_op(scan_model, scan_points):
    with official_graph(scan_model):
        count = fvcore_flops(scan_model, scan_points)
    ref = closed_form()
    ops = count.by_operator
    assert ops["scaled_dot_product_attention"] == ref["attention"]
    assert ops["conv"] == ref["conv"]
    assert ops["linear"] == ref["linear"]
    assert ops["batch_norm"] + ops["layer_norm"] == ref["fvcore_norms"]
    # FPS: 3 multiply-adds per point per pick; kNN: 3 per (center, point) pair.
    assert ops["furthest_point_sample"] == 2048 * 3 * 128
    assert ops["knn"] == 128 * 2048 * 3
    assert count.total == sum(ops.values())
    assert count.total / 1e9 == pytest.approx(PUBLISHED_FVCORE_GFLOPS, rel=0.01)
    assert count.unexplained == []
    assert "aten::gelu" in count.skipped  # left at zero by convention, with its reason


def test_official_graph_computes_the_same_function_and_restores(scan_model, scan_points):
    with torch.no_grad():
        fast = scan_model(scan_points)
        with official_graph(scan_model):
            official = scan_model(scan_points)
    torch.testing.assert_close(official, fast, rtol=1e-4, atol=1e-5)
    assert "forward" not in vars(scan_model.encoder)
    # the executed graph is cheaper by the split 512-wide layer: (P - G) * 256 * 512
    with torch.no_grad():
        executed = module_macs(scan_model, scan_points)
    assert closed_form()["module_macs"] - executed == (128 * 32 - 128) * 256 * 512


class _Attention(nn.Module):
    def __init__(self, fused: bool):
        super().__init__()
        self.fused = fused

    def forward(self, q, k, v):
        if self.fused:
            return F.scaled_dot_product_attention(q, k, v)
        attn = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(-1)
        return attn @ v


def test_sdpa_handle_equals_fvcore_count_of_explicit_matmuls():
    # cross-attention shapes: L != S and value width != key width
    q, k, v = torch.randn(2, 3, 7, 16), torch.randn(2, 3, 11, 16), torch.randn(2, 3, 11, 5)
    fused = fvcore_flops(_Attention(True), (q, k, v))
    explicit = fvcore_flops(_Attention(False), (q, k, v))
    assert fused.total == explicit.total == 2 * 3 * 7 * 11 * (16 + 5)
    assert fused.unexplained == [] and explicit.unexplained == []


class _Grouping(nn.Module):
    def forward(self, xyz, query):
        idx = furthest_point_sample(xyz, 10)
        _, nbr = knn(xyz, query, 4)
        return idx.float().sum() + nbr.float().sum()


def test_point_op_handles_use_the_right_sizes():
    xyz, query = torch.rand(2, 50, 3), torch.rand(2, 7, 3)
    count = fvcore_flops(_Grouping(), (xyz, query))
    assert count.by_operator["furthest_point_sample"] == 2 * 50 * 3 * 10
    assert count.by_operator["knn"] == 2 * 7 * 50 * 3
    assert count.unexplained == []


def test_module_macs_thop_formulas_modules_and_functional():
    net = nn.Sequential(nn.Conv1d(4, 6, 3, groups=2), nn.BatchNorm1d(6), nn.Flatten(),
                        nn.Linear(6 * 8, 5), nn.LayerNorm(5, elementwise_affine=False)).eval()
    x = torch.randn(2, 4, 10)
    expected = (2 * 6 * 8) * (4 // 2) * 3 + 4 * (2 * 6 * 8) + 2 * 5 * 48 + 2 * (2 * 5)
    assert module_macs(net, x) == expected

    class Functional(nn.Module):  # the layer's weight used outside its module
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 3)

        def forward(self, x):
            return F.linear(x, self.lin.weight * 2, self.lin.bias)

    assert module_macs(Functional(), torch.randn(5, 8)) == 5 * 3 * 8


def _small_cfg(method="lora"):
    return load_config(ROOT / "configs/demo.yaml", [f"adapter.method={method}",
                                                     "model.cls_dim=10"])


def test_merge_removes_adapter_cost_and_parameters():
    cfg = _small_cfg()
    points = sample_points(cfg["data"]["npoints"])
    plain = build_adapted(cfg, "full")
    lora = build_adapted(cfg, "lora")
    report = complexity_report(lora, cfg["data"]["npoints"], executed=False)
    with official_graph(plain):
        plain_flops = fvcore_flops(plain, points).total
    assert report["merged"]["flops"] == plain_flops
    r = lora.pointclora_adapter["options"]["r"]
    depth, C = cfg["model"]["depth"], cfg["model"]["trans_dim"]
    # LoRA on q, k, v (split) and proj: B A formed once per pass, r * d_in * d_out each
    assert report["flops"] - plain_flops == depth * 4 * r * C * C
    assert report["gmacs_modules"] == report["merged"]["gmacs_modules"]
    adapter_params = depth * 4 * r * (C + C)
    total = sum(p.numel() for p in plain.parameters())
    assert report["params_total"] == total + adapter_params
    assert report["merged"]["params_total"] == total
    assert report["merged"]["params_trainable"] == total


def _run_tool(argv, capsys):
    main = runpy.run_path(str(ROOT / "tools/flops.py"))["main"]
    code = main(argv)
    return code, capsys.readouterr()


def test_tool_json_matches_a_model_built_by_hand(capsys):
    code, out = _run_tool(["--config", str(ROOT / "configs/demo.yaml"), "--set",
                           "model.cls_dim=10", "--json"], capsys)
    assert code == 0
    result = json.loads(out.out)
    for key in ("gflops", "gmacs_modules", "params_total", "params_trainable",
                "params_trainable_no_head"):
        assert key in result
    cfg = _small_cfg("clora")
    model = PointMAE(**{k: v for k, v in cfg["model"].items() if k not in ("name", "pretrained")})
    apply_adapter(model, "clora")
    counts = parameter_report(model)
    assert result["params_total"] == counts["total"]
    assert result["params_trainable"] == counts["trainable"]
    assert result["params_trainable_no_head"] == counts["trainable_no_head"]
    with official_graph(model.eval()):
        macs = module_macs(model, sample_points(cfg["data"]["npoints"]))
    assert result["gmacs_modules"] == pytest.approx(macs / 1e9)


def test_tool_all_methods_table(tmp_path, capsys):
    table = tmp_path / "table.md"
    code, out = _run_tool(["--config", str(ROOT / "configs/demo.yaml"), "--set",
                           "model.cls_dim=10", "--all-methods", "--table-out", str(table),
                           "--json"], capsys)
    assert code == 0
    result = json.loads(out.out)
    assert table.read_text() == result["table"]
    rows = {r["method"]: r for r in result["methods"]}
    assert list(rows) == list(METHODS)
    plain = PointMAE(**{k: v for k, v in _small_cfg()["model"].items()
                        if k not in ("name", "pretrained")})
    plain_total = sum(p.numel() for p in plain.parameters())
    assert rows["full"]["params_trainable"] == plain_total
    assert rows["linear"]["params_trainable_no_head"] == 0
    for method, row in rows.items():
        assert all(op["reason"] for op in row["uncounted_ops"].values()), method
        if not row["mergeable"]:  # prompts and nonlinear adapters (tests/test_baselines.py)
            assert row["merged"] is None and row["flops"] > rows["full"]["flops"], method
            continue
        assert row["merged"]["params_total"] == plain_total, method
        assert row["merged"]["flops"] == rows["full"]["flops"], method  # merged = backbone
    assert rows["lora"]["flops"] > rows["lora"]["merged"]["flops"]
    md_rows = [line for line in result["table"].splitlines() if line.startswith("| ")]
    assert [r.split("|")[1].strip() for r in md_rows[1:]] == list(METHODS)
    assert f"| {rows['lora']['gflops']:.4f} | {rows['lora']['merged']['gflops']:.4f} |" \
        in md_rows[1 + METHODS.index("lora")]


def test_tool_reports_bad_config(tmp_path, capsys):
    code, out = _run_tool(["--config", str(tmp_path / "missing.yaml")], capsys)
    assert code == 2
    assert "missing.yaml" in out.err
