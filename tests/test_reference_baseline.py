"""The benchmark baseline (official Point-MAE code) computes what ``PointMAE`` computes.

The benchmarks compare our model code with ``benchmarks/reference_pointmae.py``; the
comparison only means something if both are the same function of the same weights: same
state-dict keys, same logits in eval and train mode (BatchNorm batch statistics, dropout and
drop-path under the same seed), same gradients and BatchNorm running statistics.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

from pointclora.models import PointMAE

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(cls_dim=5, num_group=16, group_size=8, trans_dim=48, encoder_dims=48, depth=2,
             num_heads=6, drop_path_rate=0.1)
FULL = dict(cls_dim=15, num_group=128, group_size=32)  # the benchmark setting (ScanObjectNN)


def _reference_module():
    spec = importlib.util.spec_from_file_location(
        "reference_pointmae", ROOT / "benchmarks" / "reference_pointmae.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ReferencePointMAE = _reference_module().ReferencePointMAE


def pair(cfg: dict = SMALL, seed: int = 0):
    """Our model with non-trivial weights (BN statistics included) and the baseline, loaded
    with the same state dict."""
    torch.manual_seed(seed)
    ours = PointMAE(**cfg)
    with torch.no_grad():
        for t in ours.state_dict().values():
            if t.is_floating_point():
                t.add_(0.05 * torch.randn_like(t))
        for m in ours.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.running_var.copy_(0.5 + torch.rand_like(m.running_var))
    ref = ReferencePointMAE(**cfg)
    ref.load_state_dict(ours.state_dict())
    return ours, ref


def clouds(batch: int = 3, n: int = 128, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, n, 3, generator=torch.Generator().manual_seed(seed))


def test_same_state_dict_keys_as_point_mae_and_the_official_list(fixtures):
    ours, ref = PointMAE(cls_dim=40), ReferencePointMAE(cls_dim=40)
    ref_state = ref.state_dict()
    assert list(ref_state) == list(ours.state_dict())
    rows = [line.split("\t") for line in
            (fixtures / "keys" / "point_mae_finetune_cls40.tsv").read_text().splitlines()
            if line and not line.startswith("#")]
    assert [r[0] for r in rows] == list(ref_state)
    assert [r[1] for r in rows] == [str(list(t.shape)) for t in ref_state.values()]


def test_eval_outputs_match():
    ours, ref = pair()
    ours.eval(), ref.eval()
    points = clouds()
    with torch.no_grad():
        torch.testing.assert_close(ours(points), ref(points), rtol=1e-4, atol=1e-5)


def test_train_mode_outputs_gradients_and_running_stats_match():
    """BatchNorm on batch statistics; dropout and drop-path draw the same masks. In float64,
    so that the two orders of summation agree to 1e-9 and any real difference shows."""
    ours, ref = pair()
    ours.double().train(), ref.double().train()
    points = clouds(batch=4).double()
    weights = torch.randn(4, SMALL["cls_dim"], dtype=torch.float64)
    outputs = []
    for model in (ours, ref):
        torch.manual_seed(7)
        out = model(points)
        (out * weights).sum().backward()
        outputs.append(out)
    assert outputs[0].abs().sum() > 0
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-9, atol=1e-10)
    for (name, a), b in zip(ours.state_dict().items(), ref.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=name)  # BN running stats
    for (name, a), b in zip(ours.named_parameters(), ref.parameters(), strict=True):
        assert a.grad is not None and b.grad is not None, name
        # biases in front of a BatchNorm get a zero gradient up to rounding: scale by >= 1
        atol = 1e-9 * max(b.grad.abs().max().item(), 1.0)
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=atol, msg=name)


def test_drop_path_changes_the_train_output():
    """Guards the train-mode test: the masks do matter, so equal outputs mean equal masks."""
    ours, _ = pair()
    ours.train()
    points = clouds(batch=4)
    torch.manual_seed(7)
    a = ours(points)
    torch.manual_seed(8)
    b = ours(points)
    assert not torch.allclose(a, b)


@pytest.mark.parametrize(("mode", "dtype", "tol"), [("eval", torch.float32, 1e-4),
                                                    ("train", torch.float64, 1e-9)])
def test_full_size_scanobjectnn_setting_matches(mode, dtype, tol):
    """The benchmark's own setting: 2048 points, 128 groups of 32, full-size Point-MAE."""
    ours, ref = pair(FULL)
    ours.to(dtype), ref.to(dtype)
    getattr(ours, mode)(), getattr(ref, mode)()
    points = clouds(batch=3, n=2048).to(dtype)
    with torch.no_grad():
        torch.manual_seed(3)
        a = ours(points)
        torch.manual_seed(3)
        b = ref(points)
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)
