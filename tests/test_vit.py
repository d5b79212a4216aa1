"""timm ViT backbones: weight files in Google's npz layout and timm's, adapters on stock timm.

The npz files are written from a timm model in the key layout of Google's original release
(``Transformer/encoderblock_i/MultiHeadDotProductAttention_1/query/kernel`` ...) by a
mapping written out here, and timm's own npz reader (``_load_weights``) is the independent
reference our converter must agree with.
"""
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from pointclora.models import build_model
from pointclora.models.checkpoint import CheckpointError, CheckpointNotFoundError
from pointclora.models.vit import GOOGLE_MEAN, build_vit, load_vit_weights

TINY = dict(arch="vit_tiny_patch16_224", img_size=32, depth=2, drop_path_rate=0.0)


def tiny(cls_dim=5, seed=0, **kw):
    torch.manual_seed(seed)
    model = build_vit(cls_dim=cls_dim, **{**TINY, **kw})
    with torch.no_grad():  # no zero biases or unit norms: every tensor must move
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.eval()


def google_npz(model, path, head_classes=21843, pre_logits=True):
    """``model`` written in the original ViT-B_16.npz key layout (Flax kernels (in, out))."""
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    D = sd["cls_token"].shape[-1]
    H = model.blocks[0].attn.num_heads
    w = {"embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
         "embedding/bias": sd["patch_embed.proj.bias"], "cls": sd["cls_token"],
         "Transformer/posembed_input/pos_embedding": sd["pos_embed"],
         "Transformer/encoder_norm/scale": sd["norm.weight"],
         "Transformer/encoder_norm/bias": sd["norm.bias"]}
    for i in range(len(model.blocks)):
        g, b = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
        for ln, name in (("LayerNorm_0", "norm1"), ("LayerNorm_2", "norm2")):
            w[g + ln + "/scale"] = sd[b + name + ".weight"]
            w[g + ln + "/bias"] = sd[b + name + ".bias"]
        qkv_w, qkv_b = sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"]
        for j, n in enumerate(("query", "key", "value")):
            w[f"{g}MultiHeadDotProductAttention_1/{n}/kernel"] = \
                qkv_w[j * D:(j + 1) * D].T.reshape(D, H, D // H)
            w[f"{g}MultiHeadDotProductAttention_1/{n}/bias"] = \
                qkv_b[j * D:(j + 1) * D].reshape(H, D // H)
        w[f"{g}MultiHeadDotProductAttention_1/out/kernel"] = \
            sd[b + "attn.proj.weight"].T.reshape(H, D // H, D)
        w[f"{g}MultiHeadDotProductAttention_1/out/bias"] = sd[b + "attn.proj.bias"]
        for j in (0, 1):
            w[f"{g}MlpBlock_3/Dense_{j}/kernel"] = sd[f"{b}mlp.fc{j + 1}.weight"].T
            w[f"{g}MlpBlock_3/Dense_{j}/bias"] = sd[f"{b}mlp.fc{j + 1}.bias"]
    rng = np.random.default_rng(0)
    if pre_logits:
        w["pre_logits/kernel"] = rng.normal(size=(D, D)).astype(np.float32)
        w["pre_logits/bias"] = np.zeros(D, np.float32)
    if head_classes:
        w["head/kernel"] = rng.normal(size=(D, head_classes)).astype(np.float32)
        w["head/bias"] = rng.normal(size=head_classes).astype(np.float32)
    np.savez(path, **w)
    return path


def test_vit_b16_backbone_has_the_published_parameter_count():
    model = build_vit(cls_dim=0)  # vit_base_patch16_224, no head, built without a download
    assert sum(p.numel() for p in model.parameters()) == 85_798_656


def test_google_npz_loads_as_timm_reads_it(tmp_path):
    source = tiny()
    path = google_npz(source, tmp_path / "ViT-B_16.npz", head_classes=11)
    ours = tiny(seed=1)
    report = load_vit_weights(ours, path)
    reference = tiny(seed=1)
    from timm.models.vision_transformer import _load_weights

    _load_weights(reference, str(path))
    ref_sd, our_sd, src_sd = reference.state_dict(), ours.state_dict(), source.state_dict()
    for key in our_sd:
        torch.testing.assert_close(our_sd[key], ref_sd[key], rtol=0, atol=0, msg=key)
        if not key.startswith("head."):  # the 11-class head of the file is not the model's
            torch.testing.assert_close(our_sd[key], src_sd[key], rtol=0, atol=0, msg=key)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(ours.forward_features(x), source.forward_features(x))
    assert report.head_loaded is False
    assert sorted(report.expected_missing) == ["head.bias", "head.weight"]
    assert not report.missing and not report.unexpected
    assert {"pre_logits/kernel", "pre_logits/bias", "head.weight"} <= set(report.ignored)
    assert len(report.loaded) == len(our_sd) - 2
    assert tuple(ours.pretrained_cfg["mean"]) == GOOGLE_MEAN == (0.5, 0.5, 0.5)
    assert "mean = std = 0.5" in str(report)


def test_npz_head_of_the_model_size_is_loaded(tmp_path):
    source = tiny()
    path = google_npz(source, tmp_path / "ft.npz", head_classes=0, pre_logits=False)
    w = dict(np.load(path))
    w["head/kernel"] = source.head.weight.detach().numpy().T
    w["head/bias"] = source.head.bias.detach().numpy()
    np.savez(path, **w)
    model = tiny(seed=1)
    report = load_vit_weights(model, path)
    assert report.head_loaded and not report.expected_missing and not report.ignored
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(x), source(x))


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_timm_state_dict_files(tmp_path, suffix):
    source = tiny()
    path = tmp_path / f"vit{suffix}"
    if suffix == ".pth":
        torch.save({"model": source.state_dict(), "epoch": 3}, path)
    else:
        from safetensors.torch import save_file

        save_file(source.state_dict(), str(path))
    model = build_model({"name": "timm_vit", "cls_dim": 5, "pretrained": str(path), **TINY})
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model.eval()(x), source(x))
    assert type(model) is type(timm.create_model("vit_tiny_patch16_224"))  # the stock class
    report = load_vit_weights(tiny(seed=1), path)
    assert report.head_loaded and len(report.loaded) == len(source.state_dict())


def test_config_options_are_checked():
    with pytest.raises(ValueError, match="unknown model option.*trust_pickle"):
        build_model({"name": "timm_vit", "trust_pickle": True, **TINY})
    with pytest.raises(ValueError, match="not a timm architecture"):
        build_vit(arch="vit_bsae_patch16_224")


def test_wrong_files_are_refused(tmp_path):
    model = tiny()
    with pytest.raises(CheckpointNotFoundError, match="ViT-B_16.npz"):
        load_vit_weights(model, tmp_path / "absent.npz")
    mae = tmp_path / "pretrain.pth"
    torch.save({"base_model": {"MAE_encoder.blocks.blocks.0.attn.qkv.weight":
                               torch.zeros(1152, 384)}}, mae)
    with pytest.raises(CheckpointError, match="point-cloud backbone"):
        load_vit_weights(model, mae)
    other = tmp_path / "other.npz"
    np.savez(other, weights=np.zeros(3))
    with pytest.raises(CheckpointError, match="not a Google ViT npz"):
        load_vit_weights(model, other)
    small = google_npz(tiny(embed_dim=96, num_heads=3), tmp_path / "small.npz")
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_vit_weights(model, small)
    broken = tmp_path / "broken.npz"
    broken.write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(CheckpointError, match="broken.npz"):
        load_vit_weights(model, broken)


def test_missing_keys_are_loud(tmp_path):
    source = tiny()
    state = {k: v for k, v in source.state_dict().items() if not k.startswith("blocks.1.mlp")}
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="missing 4 key"):
        load_vit_weights(tiny(seed=1), path)
    report = load_vit_weights(tiny(seed=1), path, strict=False)
    assert sorted(report.missing) == sorted(k for k in source.state_dict()
                                            if k.startswith("blocks.1.mlp"))
    assert "MISSING" in str(report)


def test_pos_embed_is_resampled_to_the_model_grid(tmp_path):
    path = google_npz(tiny(), tmp_path / "v.npz")
    model = tiny(img_size=48)
    report = load_vit_weights(model, path)
    assert model.pos_embed.shape == (1, 1 + 9, 192) and not report.missing


# ---- adapters on the stock timm model ------------------------------------------------------

def perturb_adapters(model):
    """Non-zero adapter weights (at init they are the identity: nothing to merge)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and not name.startswith("head"):
                p.add_(0.05 * torch.randn_like(p))


@pytest.mark.parametrize("method", ["lora", "clora", "serial_lora", "aoft"])
def test_adapters_merge_into_a_stock_timm_model(tmp_path, method):
    from pointclora.adapters import adapter_state_dict, apply_adapter, load_adapter, merge_adapter

    torch.manual_seed(0)
    model = tiny()
    x = torch.randn(2, 3, 32, 32)
    plain = model(x)
    apply_adapter(model, method)  # the defaults this module registers for timm's ViT
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"head.weight", "cls_token", "pos_embed"} <= trainable
    assert not any(n.startswith(("blocks.0.mlp", "patch_embed", "norm.")) for n in trainable)
    torch.testing.assert_close(model(x), plain, rtol=0, atol=0)  # identity at init
    perturb_adapters(model)
    adapted = model(x)
    assert (adapted - plain).abs().max() > 1e-3
    torch.save(adapter_state_dict(model), tmp_path / "adapter.pth")
    merged = merge_adapter(model)
    assert type(merged) is type(timm.create_model("vit_tiny_patch16_224"))
    fresh = tiny(seed=3)
    fresh.load_state_dict(merged.state_dict(), strict=True)
    torch.testing.assert_close(fresh(x), adapted, rtol=1e-5, atol=1e-5)
    reloaded = load_adapter(tiny(), tmp_path / "adapter.pth")  # same frozen weights
    torch.testing.assert_close(reloaded(x), adapted, rtol=1e-5, atol=1e-5)


def test_our_lora_equals_peft_lora_given_the_same_factors():
    """HF PEFT's LoRA on timm's fused qkv is the independent reference: same A, B, outputs
    and gradients (our split_qkv off: one pair per layer, as PEFT builds it)."""
    peft = pytest.importorskip("peft")
    from pointclora.adapters import apply_adapter

    torch.manual_seed(0)
    ours, theirs = tiny(), tiny()
    theirs.load_state_dict(ours.state_dict())
    apply_adapter(ours, "lora", r=4, alpha=8.0, target_modules=["attn.qkv"], split_qkv=False,
                  train_tokens=False)
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["qkv"],
                             modules_to_save=["head"])
    theirs = peft.get_peft_model(theirs, config)
    with torch.no_grad():
        for i, block in enumerate(ours.blocks):
            A, B = torch.randn(4, 192), torch.randn(576, 4)
            block.attn.qkv.lora_A.copy_(A[None])
            block.attn.qkv.lora_B.copy_(B[None])
            layer = theirs.base_model.model.blocks[i].attn.qkv
            layer.lora_A["default"].weight.copy_(A)
            layer.lora_B["default"].weight.copy_(B)
    count = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)  # noqa: E731
    assert count(ours) == count(theirs) == 2 * (4 * 192 + 576 * 4) + 192 * 5 + 5
    ours, theirs = ours.double(), theirs.double()  # float64: no summation-order noise
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    out_ours, out_theirs = ours(x), theirs(x)
    torch.testing.assert_close(out_ours, out_theirs)
    (out_ours.square().sum()).backward()
    (out_theirs.square().sum()).backward()
    for i, block in enumerate(ours.blocks):
        layer = theirs.base_model.model.blocks[i].attn.qkv
        torch.testing.assert_close(block.attn.qkv.lora_A.grad[0],
                                   layer.lora_A["default"].weight.grad)
        torch.testing.assert_close(block.attn.qkv.lora_B.grad[0],
                                   layer.lora_B["default"].weight.grad)
    torch.testing.assert_close(ours.head.weight.grad,
                               theirs.base_model.model.head.modules_to_save["default"].weight.grad)


# ---- the engine on an image config ---------------------------------------------------------

def test_image_config_trains_and_its_checkpoint_evaluates_the_same(tmp_path):
    from pointclora.config import load_config
    from pointclora.engine.checkpoint import load_checkpoint
    from pointclora.engine.distributed import DistInfo
    from pointclora.engine.evaluate import evaluate_checkpoint
    from pointclora.engine.trainer import fit

    demo = Path(__file__).resolve().parents[1] / "configs" / "demo_image.yaml"
    cfg = load_config(demo, [
        "data.samples_per_class=6", "data.num_classes=4", "model.depth=1", "train.epochs=2",
        "train.batch_size=8", "train.val_every=1", f"output_dir={tmp_path / 'run'}"])
    metrics = fit(cfg, tmp_path / "run", DistInfo())
    assert metrics["task"] == "image_classification" and metrics["parameters"]["trainable"] > 0
    assert "no resize (32 px)" in metrics["protocol"]
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pth")
    result = evaluate_checkpoint(ckpt["config"], ckpt, DistInfo())
    assert result["samples"] == 24 and result["acc"] == metrics["final_acc"]


def test_flops_of_an_image_config_against_the_vit_formula():
    from pointclora.analysis.report import build_adapted, complexity_report, example_input
    from pointclora.config import load_config

    demo = Path(__file__).resolve().parents[1] / "configs" / "demo_image.yaml"
    cfg = load_config(demo, ["model.cls_dim=10"])
    sample = example_input(cfg["data"])
    assert sample.shape == (1, 3, 32, 32)
    plain = complexity_report(build_adapted(cfg, "full"), sample, executed=False)
    N, D, depth, patch = 1 + (32 // 8) ** 2, 64, 2, 8  # tokens, width, blocks, patch size
    block = N * D * 3 * D + 2 * N * N * D + N * D * D + 2 * N * D * 4 * D  # qkv, attn, proj, mlp
    matmuls = (N - 1) * 3 * patch * patch * D + depth * block + D * 10
    ops = plain["flops_by_operator"]
    assert ops["conv"] + ops["linear"] + ops["scaled_dot_product_attention"] == matmuls
    lora = complexity_report(build_adapted(cfg, "lora"), sample, executed=False)
    assert lora["flops"] > plain["flops"] and lora["merged"]["flops"] == plain["flops"]


def test_visualize_tool_on_an_image_checkpoint(tmp_path):
    import importlib.util
    import json

    from pointclora.config import load_config
    from pointclora.data import build_dataset
    from pointclora.engine.build import build_run_model
    from pointclora.engine.checkpoint import model_payload, save_checkpoint
    from pointclora.viz.images import image_array, letterbox

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "configs" / "demo_image.yaml", [
        "data.samples_per_class=6", "data.num_classes=4", "model.depth=1", "model.cls_dim=4",
        "adapter.method=full"])
    torch.manual_seed(0)
    model, init = build_run_model(cfg)
    ckpt = tmp_path / "best.pth"
    save_checkpoint({"config": cfg, "method": "full", "epoch": 0,
                     **model_payload(model, cfg, init)}, ckpt)
    spec = importlib.util.spec_from_file_location("visualize", root / "tools" / "visualize.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path / "vis"
    assert tool.main(["--ckpt", str(ckpt), "--out", str(out), "--samples", "5",
                      "--per-page", "4", "--tile", "64"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    dataset = build_dataset(cfg["data"], "test")
    with torch.no_grad():  # an independent forward of the normalised test images
        pred = model.eval()(torch.stack([dataset[i][0] for i in range(len(dataset))]))
    pred = pred.argmax(-1)
    assert summary["evaluated"] == 24 and summary["renderer"] == "images"
    assert summary["predictions"] == pred[summary["samples"]].tolist()
    wrong = set(torch.nonzero(pred != torch.as_tensor(dataset.labels)).flatten().tolist())
    assert set(summary["worst_mistakes"]) <= wrong
    assert {"samples_000.png", "samples_001.png", "summary.json"} <= {
        p.name for p in out.iterdir()}
    # a tile is the image before normalisation, upscaled pixel by pixel
    raw = image_array(dataset.load(0))
    assert (letterbox(raw, 64) == raw.repeat(2, 0).repeat(2, 1)).all()
    assert tool.main(["--ckpt", str(ckpt), "--out", str(tmp_path / "p"), "--patches"]) == 2


def test_runs_warn_when_inputs_are_not_normalised_as_the_npz_weights_expect():
    from pointclora.config import load_config
    from pointclora.engine.build import run_warnings

    cifar = Path(__file__).resolve().parents[1] / "configs" / "vtab" / "cifar.yaml"
    assert run_warnings(load_config(cifar)) == []  # the shipped recipe normalises with 0.5
    imagenet = load_config(cifar, ["data.mean=[0.485, 0.456, 0.406]"])
    (warning,) = run_warnings(imagenet)
    assert "mean = std = 0.5" in warning and "ViT-B_16.npz" in warning
    assert run_warnings(load_config(cifar, ["data.mean=[0.485, 0.456, 0.406]",
                                            "model.pretrained=vit.safetensors"])) == []
