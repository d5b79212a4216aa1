"""Official key layouts and checkpoint loading, against the key lists of the official models.

Checkpoint files are synthesised in each official layout from ``tests/fixtures/keys/*.tsv``
(every key and shape, decoder / dVAE / momentum-encoder / queue keys included). Tensors that
only need a shape are stride-0 expansions of one number, so even full-size files cost a few
kilobytes.
"""
import argparse
import copy
import logging
import re
import zipfile

import pytest
import torch
from torch import nn

from pointclora.models import (
    HEAD_PREFIX,
    CheckpointError,
    CheckpointNotFoundError,
    PointBERT,
    PointMAE,
    UnsafeCheckpointError,
    build_model,
)

# layout -> (key file, backbone, prefix of the backbone keys, keys fine-tuning must ignore)
LAYOUTS = {
    "mae_pretrain": ("point_mae_pretrain.tsv", PointMAE, "MAE_encoder.",
                     ("mask_token", "decoder_pos_embed.", "MAE_decoder.", "increase_dim.")),
    "bert_pretrain": ("point_bert_pretrain.tsv", PointBERT, "transformer_q.",
                      ("queue", "transformer_k.", "dvae.", "transformer_q.mask_token",
                       "transformer_q.lm_head.", "transformer_q.cls_head.")),
    "mae_finetune": ("point_mae_finetune_cls40.tsv", PointMAE, "", ()),
    "bert_finetune": ("point_bert_finetune_cls40.tsv", PointBERT, "", ()),
}
SMALL = dict(cls_dim=40, num_group=16, group_size=8, depth=2)  # official widths, two blocks


def read_keys(docs, name):
    """[(key, shape, dtype)] of an official key file."""
    rows = []
    for line in (docs / "keys" / name).read_text().splitlines():
        if line and not line.startswith("#"):
            key, shape, dtype = line.split("\t")
            rows.append((key, [int(s) for s in re.findall(r"\d+", shape)], dtype))
    return rows


def official_state(docs, layout, depth=12, source=None, module=False):
    """A state dict in an official layout: the key file's keys and shapes, blocks >= depth left
    out. Backbone keys take ``source``'s tensor when given, other keys the number key-index+1."""
    tsv, _, prefix, _ = LAYOUTS[layout]
    state = {}
    for i, (key, shape, dtype) in enumerate(read_keys(docs, tsv)):
        name = key[len(prefix):] if key.startswith(prefix) else None
        block = re.match(r"blocks\.blocks\.(\d+)\.", name or "")
        if block and int(block.group(1)) >= depth:
            continue
        if source is not None and name in source:
            assert list(source[name].shape) == shape, key
            value = source[name].clone()
        else:
            value = torch.full((), i + 1, dtype=getattr(torch, dtype)).expand(shape)
        state["module." * module + key] = value
    return state


def save(path, state, container="base_model"):
    """Write ``state`` as the official code did (``base_model`` container), or otherwise."""
    if container == "base_model":
        obj = {"base_model": state, "epoch": 300, "metrics": {"acc": torch.tensor(93.2)},
               "best_metrics": {"acc": torch.tensor(93.4)},
               "optimizer": {"state": {}, "param_groups": [
                   {"lr": 5e-4, "betas": (0.9, 0.999), "weight_decay": 0.05, "params": [0]}]}}
    elif container == "model":
        obj = {"model": state, "epoch": 3}
    else:
        obj = state
    torch.save(obj, path)
    return path


def uninitialised(cls, **kw):
    """A full-size model without running its initialisation (fast; weights are garbage)."""
    with torch.device("meta"):
        model = cls(**kw)
    return model.to_empty(device="cpu")


def model_with_seed(cls, seed, **kw):
    torch.manual_seed(seed)
    return cls(**{**SMALL, **kw})


def randomise(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.add_(0.05 * torch.randn(t.shape, generator=g))
    return model


def head_keys(model):
    return [k for k in model.state_dict() if k.startswith(HEAD_PREFIX + ".")]


def cloud(seed=0):
    return torch.randn(2, 96, 3, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- key layout


@pytest.mark.parametrize("layout", ["mae_finetune", "bert_finetune"])
@pytest.mark.parametrize("cls_dim", [40, 15])
def test_state_dict_is_the_official_one(fixtures, layout, cls_dim):
    tsv, cls, _, _ = LAYOUTS[layout]
    expected = read_keys(fixtures, tsv)
    last = f"{HEAD_PREFIX}.{8 if cls is PointMAE else 3}."
    expected = [(k, [cls_dim, *s[1:]] if k.startswith(last) else s, d) for k, s, d in expected]
    with torch.device("meta"):
        model = cls(cls_dim=cls_dim)
    own = [(k, list(v.shape), str(v.dtype).removeprefix("torch."))
           for k, v in model.state_dict().items()]
    assert own == expected  # names, order, shapes and dtypes, BN buffers included


# ---------------------------------------------------------------- loading the official layouts


@pytest.mark.parametrize("module", [False, True], ids=["plain", "module."])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_full_size_official_files_load(fixtures, tmp_path, layout, module):
    tsv, cls, prefix, ignorable = LAYOUTS[layout]
    state = official_state(fixtures, layout, module=module)
    path = save(tmp_path / "official.pth", state)
    model = uninitialised(cls)
    report = model.load_pretrained(path)

    own = list(model.state_dict())
    fresh = {"mae_pretrain": ["cls_token", "cls_pos", *head_keys(model)],
             "bert_pretrain": head_keys(model)}.get(layout, [])
    assert report.expected_missing == fresh
    assert report.loaded == [k for k in own if k not in fresh]
    assert report.missing == [] and report.unexpected == [] and report.notes == []
    assert report.head_loaded == layout.endswith("finetune")
    file_keys = [k for k, _, _ in read_keys(fixtures, tsv)]
    assert sorted(report.ignored) == sorted(set(file_keys) - {prefix + k for k in report.loaded})
    assert all(k.startswith(ignorable) for k in report.ignored) if ignorable else \
        report.ignored == []
    values = model.state_dict()
    for key in report.loaded:
        source = state["module." * module + prefix + key]
        assert torch.equal(values[key], source.expand_as(values[key])), key


# Every layout, every container, with and without the ``module.`` prefix.
CASES = [("mae_pretrain", "base_model", True), ("bert_pretrain", "bare", True),
         ("mae_finetune", "model", False), ("bert_finetune", "base_model", False)]


@pytest.mark.parametrize("layout, container, module", CASES)
def test_loaded_weights_are_used(fixtures, tmp_path, layout, container, module):
    _, cls, prefix, _ = LAYOUTS[layout]
    source = randomise(model_with_seed(cls, 1), seed=7).eval()
    state = official_state(fixtures, layout, depth=2, source=source.state_dict(),
                           module=module)
    path = save(tmp_path / "ckpt.pth", state, container)

    target = model_with_seed(cls, 2).eval()
    untouched = copy.deepcopy(target)
    direct = copy.deepcopy(target)
    own = direct.state_dict()
    from_file = {k.removeprefix("module.").removeprefix(prefix): v for k, v in state.items()}
    from_file = {k: v for k, v in from_file.items() if k in own}
    direct.load_state_dict(from_file, strict=False)

    report = target.load_pretrained(path)
    assert sorted(report.loaded) == sorted(from_file)
    for key, value in direct.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key
    points = cloud()
    with torch.no_grad():
        out = target(points)
        assert torch.equal(out, direct(points))
        assert not torch.allclose(out, untouched(points))
        if layout.endswith("finetune"):
            assert torch.equal(out, source(points))  # everything loaded, head included


def retag_storages_as_cuda(path):
    """Rewrite a CPU checkpoint so its storages say ``cuda:0``, like files saved on a GPU."""
    with zipfile.ZipFile(path) as zin:
        entries = [(info, zin.read(info)) for info in zin.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zout:
        for info, data in entries:
            if info.filename.endswith("/data.pkl"):
                assert b"X\x03\x00\x00\x00cpu" in data  # pickle protocol 2 string 'cpu'
                data = data.replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")
            zout.writestr(info, data)


def test_cuda_checkpoint_loads_on_cpu(fixtures, tmp_path):
    state = official_state(fixtures, "mae_pretrain", depth=2, module=True)
    path = save(tmp_path / "gpu.pth", state)
    retag_storages_as_cuda(path)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(path, weights_only=True)
    model = model_with_seed(PointMAE, 0)
    report = model.load_pretrained(path)
    assert len(report.loaded) == len(model.state_dict()) - 2 - len(head_keys(model))
    assert model.norm.weight.device.type == "cpu"


@pytest.mark.parametrize("cls, layout", [(PointMAE, "mae_finetune"),
                                         (PointBERT, "bert_finetune")])
def test_head_for_other_classes_is_skipped(fixtures, tmp_path, caplog, cls, layout):
    path = save(tmp_path / "modelnet_1k.pth", official_state(fixtures, layout, depth=2))
    model = model_with_seed(cls, 0, cls_dim=15)
    head_before = copy.deepcopy(getattr(model, HEAD_PREFIX).state_dict())
    with caplog.at_level(logging.INFO, logger="pointclora"):
        report = model.load_pretrained(path)
    assert not report.head_loaded
    assert report.expected_missing == head_keys(model)
    assert report.loaded == [k for k in model.state_dict() if k not in head_keys(model)]
    assert "cls_dim 40 in the file, 15 in the model" in report.notes[0]
    assert sorted(report.ignored) == sorted(k for k in
                                            official_state(fixtures, layout, depth=2)
                                            if k.startswith(HEAD_PREFIX))
    for key, value in getattr(model, HEAD_PREFIX).state_dict().items():
        assert torch.equal(value, head_before[key]), key
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("head skipped" in w and str(path) in w for w in warnings)


def test_report_is_logged_and_readable(fixtures, tmp_path, caplog):
    path = save(tmp_path / "pretrain.pth", official_state(fixtures, "mae_pretrain", depth=2))
    model = model_with_seed(PointMAE, 0)
    with caplog.at_level(logging.INFO, logger="pointclora"):
        report = model.load_pretrained(path)
    text = str(report)
    n = len(model.state_dict())
    assert f"Loaded {n - 18}/{n} model tensors from {path}" in text
    assert "(Point-MAE pre-training checkpoint)" in text
    assert "expected missing (kept at init): cls_token, cls_pos, cls_head_finetune.* (16)" in text
    assert "mask_token" in text and "MAE_decoder.* (" in text and "increase_dim.* (2)" in text
    assert "MISSING" not in text and "UNEXPECTED" not in text
    assert any(r.name == "pointclora" and r.getMessage() == text for r in caplog.records)


def test_build_model_loads_pretrained(fixtures, tmp_path):
    state = official_state(fixtures, "bert_pretrain", depth=2)
    path = save(tmp_path / "Point-BERT.pth", state)
    model = build_model({"name": "point_bert", **SMALL, "pretrained": str(path)})
    expected = state["transformer_q.blocks.blocks.1.attn.qkv.weight"]
    assert torch.equal(model.blocks.blocks[1].attn.qkv.weight, expected.expand(1152, 384))
    assert torch.equal(model.cls_token, state["transformer_q.cls_token"].expand(1, 1, 384))


class _Payload:
    """Unpickling this runs ``os.system`` (a real code-execution pickle)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os
        return os.system, (f"touch {self.marker}",)


def test_pickled_python_objects_are_refused_unless_trusted(fixtures, tmp_path, caplog):
    state = official_state(fixtures, "mae_finetune", depth=2)
    path = tmp_path / "with_args.pth"
    torch.save({"base_model": state, "args": argparse.Namespace(config="x.yaml")}, path)
    with pytest.raises(UnsafeCheckpointError, match="argparse.Namespace.*convert_checkpoint"):
        model_with_seed(PointMAE, 0).load_pretrained(path)
    with caplog.at_level(logging.WARNING, logger="pointclora"):
        report = model_with_seed(PointMAE, 0).load_pretrained(path, trust_pickle=True)
    assert report.head_loaded
    assert any("argparse.Namespace" in r.getMessage() and "trust_pickle=True" in r.getMessage()
               for r in caplog.records)


def test_safetensors_file_loads(fixtures, tmp_path):
    """The safe format tools/convert_checkpoint.py writes for files that pickle objects."""
    from safetensors.torch import save_file

    state = official_state(fixtures, "mae_pretrain", depth=2)
    state = {k: v.contiguous() for k, v in state.items()}
    path = tmp_path / "pretrain.safetensors"
    save_file(state, str(path))
    model = model_with_seed(PointMAE, 0)
    report = model.load_pretrained(path)
    assert report.layout == "Point-MAE pre-training checkpoint"
    assert torch.equal(model.norm.weight, state["MAE_encoder.norm.weight"])
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        model.load_pretrained(path)


def test_malicious_pickle_never_runs(fixtures, tmp_path):
    marker = tmp_path / "pwned"
    state = official_state(fixtures, "mae_finetune", depth=2)
    path = tmp_path / "evil.pth"
    torch.save({"base_model": state, "payload": _Payload(marker)}, path)
    with pytest.raises(UnsafeCheckpointError, match="posix.system|os.system|nt.system"):
        model_with_seed(PointMAE, 0).load_pretrained(path)
    with pytest.raises(UnsafeCheckpointError):
        build_model({"name": "point_mae", **SMALL, "pretrained": str(path)})
    assert not marker.exists()


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("cls, layout, family, name", [
    (PointMAE, "bert_pretrain", "Point-BERT", "point_bert"),
    (PointMAE, "bert_finetune", "Point-BERT", "point_bert"),
    (PointBERT, "mae_pretrain", "Point-MAE", "point_mae"),
    (PointBERT, "mae_finetune", "Point-MAE", "point_mae"),
])
def test_wrong_backbone_file(fixtures, tmp_path, cls, layout, family, name):
    path = save(tmp_path / "other.pth", official_state(fixtures, layout, depth=2))
    with pytest.raises(CheckpointError, match=(
            rf"other\.pth: this is a {family} checkpoint .* but the model is {cls.__name__}; "
            rf"build the model with name: {name}")):
        model_with_seed(cls, 0).load_pretrained(path)


def test_shape_mismatch_names_keys_and_config(fixtures, tmp_path):
    path = save(tmp_path / "Point-BERT.pth", official_state(fixtures, "bert_pretrain", depth=2))
    model = model_with_seed(PointBERT, 0, encoder_dims=384)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(CheckpointError) as err:
        model.load_pretrained(path)
    message = str(err.value)
    assert str(path) in message and "shape mismatch for 3 key(s)" in message
    assert ("transformer_q.encoder.second_conv.3.weight [256, 512, 1] in the file vs "
            "[384, 512, 1]") in message
    assert "transformer_q.reduce_dim.weight [384, 256] in the file vs [384, 384]" in message
    assert "encoder_dims=256 (model: 384)" in message
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), "untouched"


def test_depth_mismatch_is_an_error_unless_not_strict(fixtures, tmp_path, caplog):
    path = save(tmp_path / "deep.pth", official_state(fixtures, "mae_pretrain", depth=3,
                                                      module=True))
    model = model_with_seed(PointMAE, 0)
    with pytest.raises(CheckpointError, match=(
            r"deep\.pth \(Point-MAE pre-training checkpoint\) does not match PointMAE: "
            r"unexpected 11 key\(s\): MAE_encoder\.blocks\.blocks\.2\.norm1\.weight.*"
            r"depth=3 \(model: 2\)")):
        model.load_pretrained(path)
    with caplog.at_level(logging.WARNING, logger="pointclora"):
        report = model.load_pretrained(path, strict=False)
    block = [k for k in official_state(fixtures, "mae_pretrain", depth=3)
             if k.startswith("MAE_encoder.blocks.blocks.2.")]
    assert report.unexpected == block and len(block) == 11
    assert any("11 unexpected" in r.getMessage() for r in caplog.records)

    shallow = save(tmp_path / "shallow.pth",
                   official_state(fixtures, "mae_pretrain", depth=1))
    with pytest.raises(CheckpointError, match=r"missing 11 key\(s\).*depth=1 \(model: 2\)"):
        model.load_pretrained(shallow)
    report = model.load_pretrained(shallow, strict=False)
    assert report.missing == [k.removeprefix("MAE_encoder.").replace(".2.", ".1.") for k in block]


def test_missing_encoder_key(fixtures, tmp_path):
    state = official_state(fixtures, "mae_finetune", depth=2)
    del state["encoder.first_conv.0.weight"]
    path = save(tmp_path / "partial.pth", state)
    model = model_with_seed(PointMAE, 0)
    with pytest.raises(CheckpointError, match=(
            r"partial\.pth \(fine-tuned checkpoint\) does not match PointMAE: "
            r"missing 1 key\(s\): encoder\.first_conv\.0\.weight\.")):
        model.load_pretrained(path)
    report = model.load_pretrained(path, strict=False)
    assert report.missing == ["encoder.first_conv.0.weight"] and report.head_loaded
    assert "MISSING (kept at init): encoder.first_conv.0.weight" in str(report)


def _write(path, payload):
    if isinstance(payload, bytes):
        path.write_bytes(payload)
    else:
        torch.save(payload, path)
    return path


@pytest.mark.parametrize("payload, match", [
    (b"", "the file is empty"),
    (b"\x80\x02garbage that is not a checkpoint" * 10, "not a readable PyTorch checkpoint"),
    (b"<html>404 Not Found</html>", "not a readable PyTorch checkpoint"),
    ([1, 2, 3], "holds a list, not a state dict"),
    ({}, "holds a dict, not a state dict"),
    ({"base_model": {"encoder.first_conv.0.weight": "x"}}, "non-tensor entries: encoder"),
    ({"fc.weight": torch.zeros(2, 2)}, r"no Point-MAE backbone found .*fc\.weight"),
    ({"base_model": {"MAE_decoder.norm.weight": torch.zeros(3)}}, "no Point-MAE backbone"),
])
def test_unusable_files(tmp_path, payload, match):
    path = _write(tmp_path / "bad.pth", payload)
    with pytest.raises(CheckpointError, match=match) as err:
        model_with_seed(PointMAE, 0, depth=1).load_pretrained(path)
    assert str(path) in str(err.value)
    assert isinstance(err.value, ValueError)


def test_dvae_file_is_not_a_backbone(fixtures, tmp_path):
    """Point-BERT's tokenizer file shares the mini-PointNet keys but holds no transformer."""
    dvae = {k.removeprefix("dvae."): v for k, v in
            official_state(fixtures, "bert_pretrain", depth=1).items() if k.startswith("dvae.")}
    path = save(tmp_path / "dVAE.pth", dvae)
    for cls in (PointBERT, PointMAE):
        with pytest.raises(CheckpointError, match=(
                r"dVAE\.pth: no Point-(BERT|MAE) backbone found \(no keys of its checkpoint "
                r"layouts")):
            model_with_seed(cls, 0, depth=1).load_pretrained(path)


def test_truncated_file(fixtures, tmp_path):
    path = save(tmp_path / "cut.pth", official_state(fixtures, "mae_finetune", depth=1))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"cut\.pth: not a readable PyTorch checkpoint"):
        model_with_seed(PointMAE, 0, depth=1).load_pretrained(path)


def test_missing_file(tmp_path):
    path = tmp_path / "nowhere" / "pretrain.pth"
    with pytest.raises(CheckpointNotFoundError, match="no such checkpoint file") as err:
        model_with_seed(PointMAE, 0, depth=1).load_pretrained(path)
    assert isinstance(err.value, FileNotFoundError) and isinstance(err.value, CheckpointError)
    assert str(path) in str(err.value) and "Point-MAE and Point-BERT" in str(err.value)
    with pytest.raises(FileNotFoundError):
        build_model({"name": "point_mae", "depth": 1, "pretrained": str(path)})


def test_batchnorm_buffers_load(fixtures, tmp_path):
    state = official_state(fixtures, "mae_finetune", depth=2)
    path = save(tmp_path / "ok.pth", state)
    model = model_with_seed(PointMAE, 0)
    model.load_pretrained(path)
    bn = model.encoder.first_conv[1]
    assert isinstance(bn, nn.BatchNorm1d)
    assert bn.num_batches_tracked.item() == state["encoder.first_conv.1.num_batches_tracked"]


# ---------------------------------------------------------------- this package's own run files

TINY = {"name": "point_mae", "cls_dim": 3, "num_group": 4, "group_size": 8, "trans_dim": 16,
        "depth": 1, "num_heads": 2, "encoder_dims": 16, "drop_path_rate": 0.0}


def trained_run(tmp_path, method, pretrained):
    """(training checkpoint as tools/train.py writes it, the trained model, the pretrained file).

    "Training" moves every trainable tensor, so a file that kept the initial weights shows."""
    from pointclora.adapters import apply_adapter
    from pointclora.engine.checkpoint import model_payload, save_checkpoint

    torch.manual_seed(0)
    base = None
    if pretrained:
        base = save(tmp_path / "pretrain.pth", build_model(TINY).state_dict())
    cfg = {"model": {**TINY, "pretrained": str(base) if base else None},
           "adapter": {"method": method}}
    model = build_model(cfg["model"])
    init = {k: v.clone() for k, v in model.state_dict().items()}
    apply_adapter(model, method)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    path = tmp_path / "best.pth"
    save_checkpoint({"config": cfg, "method": method, "epoch": 3,
                     **model_payload(model, cfg, None if pretrained else init)}, path)
    return path, model.eval(), base


@pytest.mark.parametrize("pretrained", [False, True], ids=["scratch", "pretrained"])
def test_adapter_run_checkpoint_as_pretrained_is_refused_with_the_commands(tmp_path, pretrained):
    from pointclora.adapters import load_adapter
    from pointclora.engine.checkpoint import load_checkpoint

    path, trained, _ = trained_run(tmp_path, "lora", pretrained)
    for load in (lambda: build_model({**TINY, "pretrained": str(path)}),
                 lambda: PointMAE(**{k: v for k, v in TINY.items() if k != "name"})
                 .load_pretrained(path)):
        with pytest.raises(CheckpointError, match=(
                rf"best\.pth is a PointCLoRA training checkpoint of a 'lora' run.*adapter and a "
                rf"head.*python tools/test\.py --ckpt {re.escape(str(path))}.*load_adapter")):
            load()
    # The advice holds: the backbone of the run's config (its pretrained file, or the initial
    # backbone stored with a run from scratch) plus the stored adapter is the trained model.
    ckpt = load_checkpoint(path)
    restored = build_model(ckpt["config"]["model"])
    if not pretrained:
        restored.load_state_dict(ckpt["base_model"])
    load_adapter(restored, ckpt["adapter"])
    points = cloud()
    with torch.no_grad():
        assert torch.equal(restored.eval()(points), trained(points))


def test_full_run_checkpoint_loads_as_pretrained(tmp_path):
    """A `full` run stores the whole fine-tuned model: it is a fine-tuned backbone file."""
    path, trained, _ = trained_run(tmp_path, "full", pretrained=False)
    model = build_model({**TINY, "pretrained": str(path)}).eval()
    with torch.no_grad():
        assert torch.equal(model(cloud()), trained(cloud()))


def test_adapter_file_as_pretrained_is_refused_with_a_hint(tmp_path):
    from pointclora.adapters import adapter_state_dict, load_adapter

    _, trained, base = trained_run(tmp_path, "clora", pretrained=True)
    path = tmp_path / "adapter.pth"
    torch.save(adapter_state_dict(trained), path)
    with pytest.raises(CheckpointError, match=(
            r"adapter\.pth is a PointCLoRA adapter file \(a 'clora' adapter\), not backbone "
            r"weights: set model\.pretrained to the pre-trained file .*load_adapter\(model, ")):
        build_model({**TINY, "pretrained": str(path)})
    # The advice holds: the pre-trained file, then the adapter, gives the trained model.
    model = load_adapter(build_model({**TINY, "pretrained": str(base)}), path).eval()
    with torch.no_grad():
        assert torch.equal(model(cloud()), trained(cloud()))
