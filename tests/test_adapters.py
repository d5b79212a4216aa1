"""Adapters on the real backbones: trainable sets, identity at init, training steps, merge,
save/load, refusals, the methods' equations and the full-size parameter counts."""
import copy
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pointclora.adapters import (
    METHODS,
    AOFTLinear,
    CLoRABank,
    CLoRALinear,
    LoRALinear,
    LowRankLinear,
    SerialLoRALinear,
    adapter_config,
    adapter_state_dict,
    ao_columns,
    apply_adapter,
    load_adapter,
    merge_adapter,
    parameter_report,
    regularization_loss,
    trained_keys,
)
from pointclora.models import PointBERT, PointMAE

SMALL = dict(cls_dim=5, depth=2, num_group=16, group_size=8)
BLOCK = r"blocks\.blocks\.[01]\.attn\."
# parameters each method adds and trains (head and tokens apart), by full name
ADAPTER_PARAMS = {
    "full": None,
    "linear": r"(?!)",
    "lora": BLOCK + r"(qkv|proj)\.lora_[AB]",
    "clora": r"clora_bank\.(down|up)\.384|" + BLOCK + r"(qkv|proj)\.clora_Q",
    "serial_lora": BLOCK + r"qkv\.serial_[AB]",
    "aoft": BLOCK + r"(qkv|proj)\.aoft_(down|up|scale)",
}
ADAPTER_TENSORS = {"full": 0, "linear": 0, "lora": 8, "clora": 6, "serial_lora": 4, "aoft": 12}
# factors whose gradient is exactly zero at step 0 because their partner starts at zero
ZERO_GRAD_AT_START = {"lora": "lora_A", "clora": "clora_bank", "serial_lora": "serial_A",
                      "aoft": "aoft_(down|up)"}
# every method with its defaults, and the variants of the papers (case -> method, options)
CASES = {m: (m, {}) for m in METHODS if m in ADAPTER_PARAMS}  # block methods: test_baselines.py
CASES["clora_alpha_output_cov"] = ("clora", {"alpha": 4.0, "sade_similarity": "output_cov"})
CASES["aoft_plain"] = ("aoft", {"form": "plain"})
ADAPTER_PARAMS["clora_alpha_output_cov"] = ADAPTER_PARAMS["clora"]
ADAPTER_PARAMS["aoft_plain"] = BLOCK + r"(qkv|proj)\.aoft_(down|B)"
ADAPTER_TENSORS.update(clora_alpha_output_cov=6, aoft_plain=8)
ZERO_GRAD_AT_START.update(clora_alpha_output_cov="clora_bank", aoft_plain="aoft_down")
HEAD_AND_TOKENS = r"cls_head_finetune\..*|cls_token|cls_pos"


def plain_name(key: str) -> str:
    return key.replace(".base_layer.", ".")


def randomise_bn_stats(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)


@pytest.fixture(scope="module")
def pretrained():
    torch.manual_seed(0)
    model = PointMAE(**SMALL)
    randomise_bn_stats(model)
    return model.eval()


@pytest.fixture
def backbone(pretrained):
    return copy.deepcopy(pretrained)


@pytest.fixture(scope="module")
def points():
    g = torch.Generator().manual_seed(1)
    return torch.rand(4, 128, 3, generator=g) * 2 - 1


LABELS = torch.tensor([0, 1, 2, 3])


def simulate_training(model: nn.Module, points: torch.Tensor) -> None:
    """Move every trainable tensor away from its init, and the live BN statistics."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g).to(p))
        model.train()(points)
    model.eval()


@pytest.mark.parametrize("case", CASES)
def test_trainable_set_and_gradients(case, backbone, points):
    method, options = CASES[case]
    apply_adapter(backbone, method, **options)
    names = {n for n, _ in backbone.named_parameters()}
    trainable = {n for n, p in backbone.named_parameters() if p.requires_grad}
    if method == "full":
        assert trainable == names
    else:
        keep = HEAD_AND_TOKENS if method != "linear" else r"cls_head_finetune\..*"
        expected = {n for n in names
                    if re.fullmatch(keep, n) or re.fullmatch(ADAPTER_PARAMS[case], n)}
        assert trainable == expected
        adapters = [n for n in names if re.fullmatch(ADAPTER_PARAMS[case], n)]
        assert len(adapters) == ADAPTER_TENSORS[case]
    loss = F.cross_entropy(backbone.train()(points), LABELS) + regularization_loss(backbone)
    loss.backward()
    got_grad = {n for n, p in backbone.named_parameters() if p.grad is not None}
    assert got_grad == trainable
    reg = regularization_loss(backbone)
    if method != "clora":
        assert reg.shape == () and reg.item() == 0 and reg.device == points.device


@pytest.mark.parametrize("case", CASES)
def test_identity_at_init_and_backbone_untouched(case, backbone, points):
    method, options = CASES[case]
    reference = backbone(points)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    apply_adapter(backbone, method, **options)
    assert torch.equal(backbone.eval()(points), reference)
    after = {plain_name(k): v for k, v in backbone.state_dict().items()}
    for key, value in before.items():
        assert torch.equal(after[key], value), key


@pytest.mark.parametrize("case", CASES)
def test_training_steps_change_only_trained_tensors(case, backbone, points):
    method, options = CASES[case]
    apply_adapter(backbone, method, **options)
    trained = set(trained_keys(backbone))
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    trainable = {n: p for n, p in backbone.named_parameters() if p.requires_grad}
    optimizer = torch.optim.SGD(backbone.parameters(), lr=0.05)  # frozen ones included
    backbone.train()
    for step in range(2):
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(backbone(points), LABELS) + regularization_loss(backbone)
        loss.backward()
        zero = {n for n, p in trainable.items() if not p.grad.any()}
        if step == 0 and case in ZERO_GRAD_AT_START:
            pattern = r".*" + ZERO_GRAD_AT_START[case] + r".*"
            assert zero == {n for n in trainable if re.fullmatch(pattern, n)} != set()
        if step == 1:
            assert zero == set(), f"no gradient reached {sorted(zero)}"
        optimizer.step()
    after = backbone.state_dict()
    for key, value in before.items():
        assert torch.equal(after[key], value) is (key not in trained), key
    if method not in ("full",):
        assert "encoder.first_conv.1.running_mean" not in trained  # frozen BN statistics
        assert "cls_head_finetune.1.running_mean" in trained


@pytest.mark.parametrize("case", CASES)
def test_merge_matches_adapted_model(case, backbone, points):
    method, options = CASES[case]
    keys = list(backbone.state_dict())
    structure = [(n, type(m)) for n, m in backbone.named_modules()]
    pretrained_qkv = backbone.blocks.blocks[0].attn.qkv.weight.clone()
    apply_adapter(backbone, method, **options)
    simulate_training(backbone, points)
    adapted = backbone(points)
    merge_adapter(backbone)
    assert list(backbone.state_dict()) == keys
    assert [(n, type(m)) for n, m in backbone.named_modules()] == structure
    assert adapter_config(backbone) is None
    assert all(p.requires_grad for p in backbone.parameters())
    torch.testing.assert_close(backbone(points), adapted, atol=1e-5, rtol=0)
    if method != "linear":
        assert not torch.equal(backbone.blocks.blocks[0].attn.qkv.weight, pretrained_qkv)
    backbone.train()
    assert backbone.encoder.first_conv[1].training  # BatchNorm follows train() again


@pytest.mark.parametrize("case", CASES)
def test_save_load_round_trip(case, backbone, pretrained, points, tmp_path):
    method, options = CASES[case]
    apply_adapter(backbone, method, **options)
    simulate_training(backbone, points)
    expected = backbone(points)
    payload = adapter_state_dict(backbone)
    assert set(payload["state_dict"]) == set(trained_keys(backbone))
    if method != "full":
        assert not any("base_layer" in k or k.startswith("encoder.") for k in payload["state_dict"])
    path = tmp_path / "adapter.pt"
    torch.save(payload, path)
    restored = copy.deepcopy(pretrained)
    assert load_adapter(restored, path) is restored
    assert adapter_config(restored) == adapter_config(backbone)
    assert torch.equal(restored.eval()(points), expected)
    again = apply_adapter(copy.deepcopy(pretrained), method, **options)  # adapted the same way
    assert torch.equal(load_adapter(again, payload).eval()(points), expected)


@pytest.mark.parametrize("method", METHODS)
def test_load_refuses_a_different_backbone(method, backbone, pretrained, points):
    apply_adapter(backbone, method)
    simulate_training(backbone, points)
    payload = adapter_state_dict(backbone)
    torch.manual_seed(123)
    other = PointMAE(**SMALL).eval()
    nudged = copy.deepcopy(pretrained)
    with torch.no_grad():
        nudged.encoder.first_conv[0].weight[0, 0, 0] += 1e-6  # one frozen number differs
    for model in (other, nudged):
        keys = list(model.state_dict())
        if method == "full":  # everything is stored: nothing of the backbone is left to differ
            load_adapter(model, payload)
            assert torch.equal(model.eval()(points), backbone(points))
            continue
        with pytest.raises(ValueError, match="different backbone"):
            load_adapter(model, payload)
        assert adapter_config(model) is None and list(model.state_dict()) == keys


def test_load_refusals_leave_the_model_unchanged(backbone, pretrained, tmp_path):
    apply_adapter(backbone, "clora")
    payload = adapter_state_dict(backbone)
    lora = apply_adapter(copy.deepcopy(pretrained), "lora")
    with pytest.raises(ValueError, match="carries 'lora'"):
        load_adapter(lora, payload)
    torch.manual_seed(0)
    wider_head = PointMAE(**{**SMALL, "cls_dim": 7})
    wider_head.load_state_dict(
        {k: v for k, v in pretrained.state_dict().items() if not k.startswith("cls_head")},
        strict=False,
    )
    with pytest.raises(ValueError, match="shape mismatch"):
        load_adapter(wider_head, payload)
    assert adapter_config(wider_head) is None
    with pytest.raises(ValueError, match="not a PointCLoRA adapter"):
        load_adapter(copy.deepcopy(pretrained), {"state_dict": {}})
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_adapter(backbone, tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt is not a readable adapter file"):
        load_adapter(backbone, tmp_path / "junk.pt")
    torch.save({"model": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="other.pt is not a PointCLoRA adapter"):
        load_adapter(backbone, tmp_path / "other.pt")


@pytest.mark.parametrize("freeze", [True, False])
def test_freeze_bn_stats_option(freeze, backbone, points):
    apply_adapter(backbone, "lora", freeze_bn_stats=freeze)
    backbone.train()
    bn = backbone.encoder.first_conv[1]
    before = bn.running_mean.clone()
    backbone(points)
    assert bn.training is not freeze
    assert torch.equal(bn.running_mean, before) is freeze
    assert ("encoder.first_conv.1.running_mean" in trained_keys(backbone)) is not freeze
    assert backbone.cls_head_finetune[1].training  # the trained head's BN keeps training


def test_bad_methods_and_options_are_refused(backbone):
    bad = [
        (("nope",), {}, "valid methods: full, linear, lora, clora, serial_lora, aoft"),
        (("lora",), {"rank": 4}, r"unknown option\(s\) \['rank'\].*valid: train_head"),
        (("full",), {"train_head": False}, r"valid: \(none\)"),
        (("lora",), {"r": 0}, "r must be an int >= 1"),
        (("lora",), {"train_head": "yes"}, "train_head must be a bool"),
        (("clora",), {"sade_similarity": "l2"}, "must be one of cross_gram, cosine, output_cov"),
        (("clora",), {"sade_weight": "1e-3"}, "YAML"),
        (("aoft",), {"init": "zeros"}, "must be one of unit, identity"),
        (("lora",), {"target_modules": ["attn.nothing"]}, "matches no nn.Linear"),
        (("aoft",), {"r": 500}, "exceeds"),
        (("clora",), {"r": 500}, "exceeds"),
    ]
    for args, options, message in bad:
        with pytest.raises(ValueError, match=message):
            apply_adapter(backbone, *args, **options)
        assert adapter_config(backbone) is None
        assert not hasattr(backbone, "clora_bank")
        assert all(isinstance(b.attn.qkv, nn.Linear) for b in backbone.blocks.blocks)
    apply_adapter(backbone, "lora")
    with pytest.raises(ValueError, match="already carries a 'lora' adapter"):
        apply_adapter(backbone, "clora")
    with pytest.raises(ValueError, match="no adapter"):
        adapter_state_dict(nn.Linear(2, 2))


def test_clora_bank_is_shared_and_counted_once(backbone):
    before = parameter_report(backbone)
    apply_adapter(backbone, "clora", p=3, r=4)
    bank = backbone.clora_bank
    wrappers = [m for m in backbone.modules() if isinstance(m, CLoRALinear)]
    assert len(wrappers) == 4 and all(w.bank is bank for w in wrappers)
    assert [k for k in backbone.state_dict() if "clora_bank" in k] == ["clora_bank.down.384",
                                                                      "clora_bank.up.384"]
    d, p, r, lrm = 384, 3, 4, 2 * 4  # q, k, v, proj in two blocks
    head = sum(v.numel() for k, v in backbone.named_parameters() if k.startswith("cls_head"))
    report = parameter_report(backbone)
    assert report["trainable"] == p * (d + d) * r + lrm * p * r * r + head + 2 * d
    assert report["total"] == before["total"] + p * (d + d) * r + lrm * p * r * r
    down = bank.down["384"].detach().permute(1, 0, 2).reshape(d, p * r)
    up = bank.up["384"].detach().reshape(p * r, d)
    torch.testing.assert_close(down.T @ down, torch.eye(p * r), atol=1e-5, rtol=0)
    torch.testing.assert_close(up @ up.T, torch.eye(p * r), atol=1e-5, rtol=0)


def test_point_bert_identity_and_merge(points):
    torch.manual_seed(0)
    model = PointBERT(**SMALL).eval()
    reference = model(points)
    for method in ("clora", "serial_lora"):
        apply_adapter(model, method)
        assert torch.equal(model.eval()(points), reference)
        merge_adapter(model)
        assert torch.equal(model.eval()(points), reference)


def test_any_module_tree_by_name_pattern():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 12), nn.ReLU(), nn.Sequential(nn.Linear(12, 12), nn.ReLU()),
                        nn.Linear(12, 3))
    x = torch.randn(6, 5)
    keys, reference = list(net.state_dict()), net(x)
    for method in ("lora", "clora", "aoft"):
        apply_adapter(net, method, target_modules=r"0|2\.0|3", r=2, train_head=False,
                      train_tokens=False)
        assert sum(isinstance(m, (LoRALinear, CLoRALinear, AOFTLinear)) for m in net.modules()) == 3
        assert torch.equal(net(x), reference)
        with torch.no_grad():
            for p in net.parameters():
                if p.requires_grad:
                    p.add_(0.1 * torch.randn_like(p))
        adapted = net(x)
        assert not torch.allclose(adapted, reference)
        merge_adapter(net)
        assert list(net.state_dict()) == keys
        reference = net(x)  # the merged model: the next method must start from it exactly
        torch.testing.assert_close(reference, adapted, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="no adapter defaults for lora: pass head=.*train_head"):
        apply_adapter(net, "lora", target_modules=["0"])


def test_adapted_model_survives_deepcopy_and_pickle(backbone, points, tmp_path):
    apply_adapter(backbone, "clora")
    simulate_training(backbone, points)
    expected = backbone(points)
    torch.save(backbone, tmp_path / "model.pt")
    for clone in (copy.deepcopy(backbone), torch.load(tmp_path / "model.pt", weights_only=False)):
        assert all(m.bank is clone.clora_bank for m in clone.modules()
                   if isinstance(m, CLoRALinear))
        clone.train()
        assert not clone.encoder.first_conv[1].training  # frozen statistics stay frozen
        assert torch.equal(clone.eval()(points), expected)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["lora", "clora", "serial_lora", "aoft"])
def test_adapter_follows_device_and_dtype(method, device):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).to(device, torch.float64)
    bare_on_cpu = copy.deepcopy(net).cpu()
    apply_adapter(net, method, target_modules=r"0|2", r=2, train_head=False, train_tokens=False)
    assert {(p.device.type, p.dtype) for p in net.parameters()} == {(device, torch.float64)}
    assert regularization_loss(net).device.type == device
    simulate_training(net, torch.randn(3, 8, dtype=torch.float64, device=device))
    x = torch.randn(5, 8, dtype=torch.float64, device=device)
    expected = net(x)
    payload = adapter_state_dict(net)
    assert {v.device.type for v in payload["state_dict"].values()} == {"cpu"}
    torch.testing.assert_close(load_adapter(bare_on_cpu, payload)(x.cpu()), expected.cpu())
    torch.testing.assert_close(merge_adapter(net)(x), expected, atol=1e-12, rtol=0)


# --- each method against its equation, with explicit per-slice loops ---------------------

def _layer(d_in=6, d_out=9):
    torch.manual_seed(0)
    return nn.Linear(d_in, d_out).double()


def _randomise(module):
    with torch.no_grad():
        for name, p in module.named_parameters():
            if not name.startswith("base_layer"):
                p.normal_()


def test_lora_equation():
    layer, x = _layer(), torch.randn(4, 6, dtype=torch.float64)
    wrapped = LoRALinear(layer, r=2, alpha=3.0, n_slices=3).double()
    _randomise(wrapped)
    lora_a, lora_b = wrapped.lora_A, wrapped.lora_B
    low_rank = torch.cat([x @ lora_a[j].T @ lora_b[j].T for j in range(3)], dim=-1)
    torch.testing.assert_close(wrapped(x), layer(x) + 1.5 * low_rank)


def test_serial_lora_equation_and_merged_weight():
    layer, x = _layer(), torch.randn(4, 6, dtype=torch.float64)
    wrapped = SerialLoRALinear(layer, r=2, alpha=3.0).double()
    _randomise(wrapped)
    a, b = wrapped.serial_A, wrapped.serial_B
    torch.testing.assert_close(wrapped(x), layer(x + 1.5 * x @ a.T @ b.T))
    w = layer.weight.detach().clone()
    expected = w @ (torch.eye(6, dtype=torch.float64) + 1.5 * b @ a)
    torch.testing.assert_close(wrapped.merge().weight, expected)


def test_clora_equation_row_convention():
    layer, x = _layer(), torch.randn(4, 6, dtype=torch.float64)
    bank = CLoRABank(p=2, r=2)
    plain = CLoRALinear(layer, bank, n_slices=3).double()
    scaled = CLoRALinear(layer, bank, n_slices=3, alpha=0.3).double()
    bank.double()
    _randomise(scaled)
    with torch.no_grad():
        plain.clora_Q.copy_(scaled.clora_Q)
    down, up, q = bank.down["6"], bank.up["3"], scaled.clora_Q
    slices = [x @ sum(down[h] @ q[j, h] @ up[h] for h in range(2)) for j in range(3)]
    low_rank = torch.cat(slices, dim=-1)
    torch.testing.assert_close(plain(x), layer(x) + low_rank)
    torch.testing.assert_close(scaled(x), layer(x) + 0.3 * low_rank)  # Delta W times alpha


def naive_q_matrix(q):
    """Q(q) = [[q0, -q_bar^T], [q_bar, I - q_bar q_bar^T / (1 + q0)]], formed in full."""
    q0, q_bar = q[0], q[1:]
    n = q.shape[0]
    top = torch.cat([q0[None], -q_bar])[None]
    bottom = torch.cat([q_bar[:, None],
                        torch.eye(n - 1, dtype=q.dtype) - torch.outer(q_bar, q_bar) / (1 + q0)], 1)
    return torch.cat([top, bottom], 0)


def test_ao_columns_match_full_matrix_and_are_orthonormal_on_the_sphere():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 7, generator=g, dtype=torch.float64)
    for r in (1, 3, 7):
        expected = torch.stack([naive_q_matrix(v)[:, :r] for v in q])
        torch.testing.assert_close(ao_columns(q, r), expected)
    unit = F.normalize(q, dim=-1)
    unit[:, 0] = unit[:, 0].abs()
    full = naive_q_matrix(unit[0])
    eye = torch.eye(7, dtype=torch.float64)
    torch.testing.assert_close(full.T @ full, eye)
    ao = ao_columns(unit, 3)
    torch.testing.assert_close(ao.transpose(-1, -2) @ ao, eye[:3, :3].expand(2, 3, 3))
    edge = torch.tensor([-1.0, 0.5, 0.5, 0.0], dtype=torch.float64)  # 1 + q0 = 0
    assert torch.isfinite(ao_columns(edge, 2)).all()


def test_aoft_equation():
    layer, x = _layer(), torch.randn(4, 6, dtype=torch.float64)
    wrapped = AOFTLinear(layer, r=2, n_slices=3).double()
    _randomise(wrapped)
    with torch.no_grad():
        wrapped.aoft_down[:, 0].abs_()
        wrapped.aoft_up[:, 0].abs_()
    deltas = [naive_q_matrix(wrapped.aoft_up[j])[:, :2] @ torch.diag(wrapped.aoft_scale[j])
              @ naive_q_matrix(wrapped.aoft_down[j])[:, :2].T for j in range(3)]
    torch.testing.assert_close(wrapped(x), layer(x) + x @ torch.cat(deltas, 0).T)


def test_aoft_plain_equation():
    """LoRA+AOFT without lambda: Delta W_j = B_j AO(q_down_j)^T, B_j zero at the start."""
    layer, x = _layer(), torch.randn(4, 6, dtype=torch.float64)
    wrapped = AOFTLinear(layer, r=2, n_slices=3, form="plain").double()
    assert torch.equal(wrapped(x), layer(x)) and not wrapped.aoft_B.any()
    assert not hasattr(wrapped, "aoft_scale") and not hasattr(wrapped, "aoft_up")
    _randomise(wrapped)
    with torch.no_grad():
        wrapped.aoft_down[:, 0].abs_()
    deltas = [wrapped.aoft_B[j] @ naive_q_matrix(wrapped.aoft_down[j])[:, :2].T
              for j in range(3)]
    torch.testing.assert_close(wrapped(x), layer(x) + x @ torch.cat(deltas, 0).T)


# --- full-size Point-MAE, ScanObjectNN head (cls_dim 15) ---------------------------------

def test_full_size_parameter_counts():
    torch.manual_seed(0)
    full_size = PointMAE(cls_dim=15)
    head, tokens, d, blocks = 267_535, 768, 384, 12

    def report(method, **options):
        counts = parameter_report(apply_adapter(full_size, method, **options))
        merge_adapter(full_size)  # the fresh adapter is the identity: back to the backbone
        return counts

    assert report("full")["trainable"] == 22_093_327  # REFERENCE section 1
    assert report("linear") == {"total": 22_093_327, "trainable": head, "trainable_no_head": 0}
    clora = report("clora")
    assert clora["trainable"] < 600_000  # PointGST's 0.6M, head included
    assert clora["trainable"] == 4 * (d + d) * 8 + blocks * 4 * 4 * 8 * 8 + head + tokens
    assert report("lora")["trainable_no_head"] == blocks * 4 * 2 * d * 8 + tokens
    for r in (4, 8, 16):
        adapter_only = dict(r=r, train_head=False, train_tokens=False)
        lora, serial = report("lora", **adapter_only), report("serial_lora", **adapter_only)
        assert lora["trainable"] == 4 * serial["trainable"] == blocks * 4 * 2 * d * r


@pytest.mark.parametrize("case", [c for c, (m, _) in CASES.items() if m not in ("full", "linear")])
def test_low_rank_backward_matches_plain_autograd(case, backbone, points):
    """The hand-written backward of the low-rank layers gives the gradients plain autograd
    gives through the dense ``W + Delta W`` path, for every trainable tensor (float64; the two
    paths associate the products differently, so equal up to rounding)."""
    method, options = CASES[case]
    apply_adapter(backbone.double(), method, **options)
    simulate_training(backbone, points.double())  # away from Delta W = 0, where terms vanish
    reference = copy.deepcopy(backbone)
    wrappers = [m for m in reference.modules() if isinstance(m, LowRankLinear)]
    assert wrappers, "no low-rank layer was injected"
    for module in wrappers:
        module.forward = module.dense_forward

    grads = []
    for model in (backbone, reference):
        torch.manual_seed(3)  # same dropout / drop-path masks
        model.train().zero_grad()
        loss = F.cross_entropy(model(points.double()), LABELS) + regularization_loss(model)
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grad, grads[1][name], rtol=1e-7, atol=1e-10, msg=name)


@pytest.mark.parametrize("n_slices", [1, 3])
def test_low_rank_layer_under_bf16_autocast(n_slices):
    """Under autocast the low-rank path computes in bfloat16 like the dense one and hands
    float32 gradients to the float32 factors."""
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(32, 48), r=4, alpha=8.0, n_slices=n_slices)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(2, 10, 32, requires_grad=True)
    results = []
    for forward in (layer.forward, layer.dense_forward):
        layer.zero_grad()
        x.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = forward(x)
        assert y.dtype == torch.bfloat16
        y.float().square().sum().backward()
        results.append([y.float(), x.grad, layer.lora_A.grad, layer.lora_B.grad])
    for name, ours, dense in zip(["y", "x", "A", "B"], *results, strict=True):
        assert ours.dtype == torch.float32, name
        torch.testing.assert_close(ours, dense, rtol=0.05, atol=0.05 * dense.abs().max().item(),
                                   msg=name)
