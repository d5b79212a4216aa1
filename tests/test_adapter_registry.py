"""The method registry and the model contract: a method added from this file alone, stock
timm ViTs adapted without any Point-MAE name, declared defaults, option checks, and files
written before the registry."""
import copy
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pointclora.adapters import (
    DEFAULT_OPTIONS,
    METHOD_REGISTRY,
    METHODS,
    AdapterLayer,
    LoRAOptions,
    LowRankOptions,
    Method,
    adapter_config,
    adapter_state_dict,
    apply_adapter,
    load_adapter,
    merge_adapter,
    model_defaults,
    parameter_report,
    register_method,
    register_model_defaults,
    registry,
    regularization_loss,
    resolve_options,
    trained_keys,
)
from pointclora.adapters.registry import POSITIVE, option
from pointclora.models import PointMAE

TINY = dict(cls_dim=4, depth=1, num_group=8, group_size=8, trans_dim=48, encoder_dims=48,
            num_heads=2)
VIT_QUALNAME = "timm.models.vision_transformer.VisionTransformer"
VIT_DEFAULTS = {"target_modules": ["attn.qkv", "attn.proj"], "blocks": r"blocks\.\d+",
                "head": ["head"], "tokens": ["cls_token", "pos_embed"]}


# --- a method declared here and nowhere else ----------------------------------------------

class ToyLinear(AdapterLayer):
    """``y = (1 + gain * delta) * (W x + b)``: a learned output rescale, one at the start."""

    def __init__(self, base_layer: nn.Linear, gain: float):
        super().__init__()
        self.base_layer, self.gain = base_layer, gain
        self.toy_delta = nn.Parameter(torch.zeros(base_layer.out_features))

    def forward(self, x):
        return self.base_layer(x) * (1 + self.gain * self.toy_delta)

    def regularization(self):
        return self.toy_delta.square().sum()

    @torch.no_grad()
    def merge(self):
        scale = 1 + self.gain * self.toy_delta
        self.base_layer.weight.mul_(scale[:, None])
        if self.base_layer.bias is not None:
            self.base_layer.bias.mul_(scale)
        return self.base_layer


@dataclass
class ToyOptions(LowRankOptions):
    gain: float = option(2.0, POSITIVE, "multiplies the learned shift")


class Toy(Method):
    name = "toy"
    Options = ToyOptions

    def wrap(self, name, module):
        return ToyLinear(module, self.options.gain)


@pytest.fixture
def toy_method():
    register_method(Toy)
    yield Toy
    del METHOD_REGISTRY["toy"]


@torch.no_grad()
def nudge_trainable(model: nn.Module) -> None:
    """Move every trainable tensor away from its init, as training would."""
    for p in model.parameters():
        if p.requires_grad:
            p.add_(0.05 * torch.randn_like(p))


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return PointMAE(**TINY).eval()


@pytest.fixture(scope="module")
def points():
    return torch.rand(4, 64, 3, generator=torch.Generator().manual_seed(1)) * 2 - 1


def test_a_method_from_one_file_trains_merges_and_saves(toy_method, tiny, points):
    assert "toy" in METHODS and METHODS[-1] == "toy"
    assert DEFAULT_OPTIONS["toy"]["gain"] == 2.0
    pretrained = copy.deepcopy(tiny)
    reference = tiny(points)
    apply_adapter(tiny, "toy", r=1)
    assert torch.equal(tiny(points), reference)
    wrapped = [n for n, m in tiny.named_modules() if isinstance(m, ToyLinear)]
    assert wrapped == ["blocks.blocks.0.attn.qkv", "blocks.blocks.0.attn.proj"]  # declared
    trainable = {n for n, p in tiny.named_parameters() if p.requires_grad}
    head = {n for n, _ in tiny.named_parameters() if n.startswith("cls_head_finetune.")}
    assert trainable == {f"{n}.toy_delta" for n in wrapped} | head | {"cls_token", "cls_pos"}

    frozen = {k: v.clone() for k, v in tiny.state_dict().items() if k not in trained_keys(tiny)}
    optimizer = torch.optim.SGD(tiny.parameters(), lr=0.1)
    labels = torch.tensor([0, 1, 2, 3])
    loss = F.cross_entropy(tiny.train()(points), labels) + regularization_loss(tiny)
    loss.backward()
    assert all(tiny.get_submodule(n).toy_delta.grad.abs().sum() > 0 for n in wrapped)
    optimizer.step()
    assert all(tiny.get_submodule(n).toy_delta.abs().sum() > 0 for n in wrapped)
    assert all(torch.equal(tiny.state_dict()[k], v) for k, v in frozen.items())
    # the method's regulariser reaches the loss through the registry's generic path
    expected_reg = sum(tiny.get_submodule(n).toy_delta.square().sum() for n in wrapped)
    torch.testing.assert_close(regularization_loss(tiny), expected_reg)

    adapted = tiny.eval()(points)
    restored = load_adapter(copy.deepcopy(pretrained), adapter_state_dict(tiny))
    assert torch.equal(restored.eval()(points), adapted)
    merge_adapter(tiny)
    assert list(tiny.state_dict()) == list(pretrained.state_dict())
    torch.testing.assert_close(tiny(points), adapted, atol=1e-6, rtol=0)


def test_registration_is_checked(toy_method):
    with pytest.raises(ValueError, match="'toy' is already registered"):
        register_method(Toy)

    class Shares(Toy):
        name = "shares"

    with pytest.raises(ValueError, match="its own Options class"):
        register_method(Shares)

    @dataclass
    class Bare(registry.Options):
        pass

    class Frozen(Method):
        name, Options = "frozen", Bare

    with pytest.raises(TypeError, match="FrozenBackboneOptions"):
        register_method(Frozen)
    assert "shares" not in METHODS and "frozen" not in METHODS
    with pytest.raises(ValueError, match="valid methods: full, linear, .*toy"):
        apply_adapter(nn.Linear(2, 2), "nope")


# --- options: checked like a config, filled from the model ---------------------------------

def test_options_name_what_is_wrong():
    with pytest.raises(ValueError, match=r"lora option r must be an int >= 1, got 0 \(int\)"):
        LoRAOptions(r=0)
    with pytest.raises(ValueError, match=r"alpha must be a number > 0.*got '16' \(str\)"):
        LoRAOptions(alpha="16")
    with pytest.raises(ValueError, match=r"form must be one of star, plain, got 'half'"):
        resolve_options("aoft", {"form": "half"})
    with pytest.raises(ValueError, match=r"target_modules must be null, a regex .*got \[\]"):
        resolve_options("lora", {"target_modules": []})
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['rank'\] .*'clora'.*valid: "
                                         r"train_head, .*alpha"):
        resolve_options("clora", {"rank": 2})
    assert LoRAOptions(target_modules=("a", "b")).target_modules == ["a", "b"]


def test_defaults_come_from_the_model(tiny, monkeypatch):
    declared = resolve_options("lora", {}, tiny)
    assert declared["target_modules"] == ["attn.qkv", "attn.proj"]
    assert (declared["head"], declared["tokens"]) == (["cls_head_finetune"],
                                                      ["cls_token", "cls_pos"])
    assert resolve_options("lora", {"head": ["x"]}, tiny)["head"] == ["x"]  # explicit wins
    # Serial LoRA sits before the fused q, k, v projection only
    assert resolve_options("serial_lora", {}, tiny)["target_modules"] == ["attn.qkv"]
    assert resolve_options("lora", {})["target_modules"] is None  # no model: left open
    monkeypatch.setattr(registry, "_MODEL_DEFAULTS", {})
    register_model_defaults(PointMAE, {"target_modules": r".*attn\.(qkv|proj)", "head": [],
                                       "tokens": []})
    with pytest.raises(ValueError, match="no adapter defaults for serial_lora: pass "
                                         r"target_modules=\.\.\. "):
        resolve_options("serial_lora", {}, tiny)  # a regex cannot be narrowed to the qkv
    nothing_kept = resolve_options("lora", {}, tiny)  # declared empty: nothing to keep
    assert (nothing_kept["train_head"], nothing_kept["train_tokens"]) == (False, False)


def test_a_model_without_defaults_says_which_option_to_set(points):
    net = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2))
    assert model_defaults(net) == {}
    with pytest.raises(ValueError, match=r"Sequential declares no adapter defaults for lora: "
                                         r"pass head=\.\.\. .*or train_head=False; "
                                         r"tokens=\.\.\. .*; target_modules=\.\.\. "):
        apply_adapter(net, "lora")
    with pytest.raises(ValueError, match=r"no adapter defaults for lora: pass tokens=\.\.\. "
                                         r"\(names of the learned token parameters\) or "
                                         r"train_tokens=False\. "):
        apply_adapter(net, "lora", target_modules=["0"], head=["2"])
    with pytest.raises(ValueError, match=r"head=\['nothing'\]: 'nothing' matches no parameter"
                                         r".*or pass train_head=False"):
        apply_adapter(net, "lora", target_modules=["0"], head=["nothing"], train_tokens=False)
    apply_adapter(net, "lora", target_modules=["0"], head=["2"], train_tokens=False)
    assert {n for n, p in net.named_parameters() if p.requires_grad} == {
        "0.lora_A", "0.lora_B", "2.weight", "2.bias"}
    assert parameter_report(net)["trainable_no_head"] == 8 * (3 + 8)  # r (d_in + d_out)


def test_modules_to_save_and_regex_names(tiny):
    apply_adapter(tiny, "lora", modules_to_save=["norm"], tokens=r"cls_(token|pos)")
    assert "norm.weight" in trained_keys(tiny) and "norm.bias" in trained_keys(tiny)
    assert not any(k.startswith("blocks.blocks.0.norm") for k in trained_keys(tiny))
    assert {"cls_token", "cls_pos"} <= set(trained_keys(tiny))
    assert set(adapter_state_dict(tiny)["state_dict"]) >= {"norm.weight", "norm.bias"}


def test_third_party_class_registered_by_name(monkeypatch, tiny):
    monkeypatch.setattr(registry, "_MODEL_DEFAULTS", {})
    register_model_defaults("pointclora.models.backbones.PointTransformer",
                            {"target_modules": ["mlp.fc1"], "head": ["cls_head_finetune"]})
    assert model_defaults(tiny)["target_modules"] == ["mlp.fc1"]  # overrides the attribute
    apply_adapter(tiny, "lora", train_tokens=False)
    assert [n for n, m in tiny.named_modules() if isinstance(m, AdapterLayer)] == [
        "blocks.blocks.0.mlp.fc1"]
    with pytest.raises(ValueError, match=r"unknown adapter default key\(s\) \['heads'\]"):
        register_model_defaults(PointMAE, {"heads": ["x"]})


def test_a_file_written_before_the_registry_still_loads(tiny, points):
    """Version-1 files store only the options that existed then (no head, tokens,
    modules_to_save, CLoRA alpha): they load with the same result."""
    pretrained = copy.deepcopy(tiny)
    apply_adapter(tiny, "clora", r=2, p=2)
    nudge_trainable(tiny)
    payload = adapter_state_dict(tiny)
    for new in ("head", "tokens", "modules_to_save", "alpha"):
        del payload["options"][new]
    restored = load_adapter(pretrained, payload)
    assert adapter_config(restored) == adapter_config(tiny)
    assert torch.equal(restored(points), tiny(points))


# --- stock timm ViTs -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def timm():
    return pytest.importorskip("timm")


def small_vit(timm):
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", num_classes=10, pretrained=False,
                             img_size=32, patch_size=8, depth=2).eval()


@pytest.fixture
def vit_defaults(monkeypatch):
    monkeypatch.setattr(registry, "_MODEL_DEFAULTS", {})
    register_model_defaults(VIT_QUALNAME, VIT_DEFAULTS)


def test_stock_timm_vit_with_explicit_options(timm, monkeypatch):
    monkeypatch.setattr(registry, "_MODEL_DEFAULTS", {})
    vit = small_vit(timm)
    images = torch.randn(2, 3, 32, 32)
    reference = vit(images)
    with pytest.raises(ValueError, match="VisionTransformer declares no adapter defaults "
                                         "for clora: pass head=.*target_modules="):
        apply_adapter(vit, "clora")
    apply_adapter(vit, "clora", target_modules=["attn.qkv", "attn.proj"], head=["head"],
                  tokens=["cls_token", "pos_embed"], sade_similarity="output_cov")
    assert torch.equal(vit(images), reference)
    loss = F.cross_entropy(vit(images), torch.tensor([1, 2])) + regularization_loss(vit)
    loss.backward()
    assert vit.clora_bank.down["192"].grad is not None


@pytest.mark.parametrize("method, options", [
    ("lora", {}), ("clora", {"alpha": 2.0}), ("serial_lora", {}), ("aoft", {}),
    ("aoft", {"form": "plain"}), ("linear", {}), ("full", {})])
def test_timm_vit_identity_merge_and_strict_reload(timm, vit_defaults, method, options):
    vit, fresh = small_vit(timm), small_vit(timm)
    images = torch.randn(2, 3, 32, 32)
    reference = vit(images)
    apply_adapter(vit, method, **options)
    assert torch.equal(vit(images), reference)
    nudge_trainable(vit)
    adapted = vit(images)
    merge_adapter(vit)
    fresh.load_state_dict(vit.state_dict(), strict=True)  # a plain timm model again
    torch.testing.assert_close(fresh(images), adapted, atol=1e-5, rtol=0)


def test_timm_vit_parameter_counts_match_the_formulas(timm, vit_defaults):
    d, blocks, r, p, head, tokens = 192, 2, 8, 4, 192 * 10 + 10, 192 + 17 * 192

    def adapter_params(method, **options):
        vit = apply_adapter(small_vit(timm), method, **options)
        counts = parameter_report(vit)
        assert counts["trainable"] - counts["trainable_no_head"] == head
        return counts["trainable_no_head"] - tokens

    lrms = blocks * 4  # q, k, v, proj
    assert adapter_params("lora") == lrms * 2 * d * r
    assert adapter_params("clora") == p * (d + d) * r + lrms * p * r * r
    assert adapter_params("serial_lora") == blocks * 2 * d * r  # one pair before qkv
    assert adapter_params("aoft") == lrms * (d + d + r)  # two vectors and r scales
    assert adapter_params("aoft", form="plain") == lrms * (d + d * r)  # a vector and B
    assert adapter_params("linear", train_tokens=True) == 0


def test_vit_base_patch16_224_takes_clora(timm, vit_defaults):
    torch.manual_seed(0)
    vit = timm.create_model("vit_base_patch16_224", num_classes=10, pretrained=False).eval()
    image = torch.randn(1, 3, 224, 224)
    reference = vit(image)
    apply_adapter(vit, "clora")
    assert torch.equal(vit(image), reference)
    d, lrms, p, r = 768, 12 * 4, 4, 8
    tokens, head = 768 + 197 * 768, 768 * 10 + 10
    assert parameter_report(vit)["trainable"] == p * 2 * d * r + lrms * p * r * r + tokens + head


def test_stock_timm_vit_takes_clora_with_only_the_adapters_imported():
    """A user's first lines: no import of pointclora.models, no option naming a module."""
    import subprocess
    import sys
    script = (
        "from pointclora.adapters import apply_adapter, merge_adapter\n"
        "import timm, torch\n"
        "m = timm.create_model('vit_tiny_patch16_224', pretrained=False, num_classes=10,"
        " img_size=32, depth=2).eval()\n"
        "x = torch.randn(2, 3, 32, 32)\n"
        "ref = m(x)\n"
        "apply_adapter(m, 'clora')\n"
        "assert torch.equal(m(x), ref)\n"
        "names = {n for n, p in m.named_parameters() if p.requires_grad}\n"
        "assert {'head.weight', 'cls_token', 'pos_embed'} <= names, names\n"
        "assert not any(n.startswith('patch_embed') for n in names), names\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
