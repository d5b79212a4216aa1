"""timm image ViTs as PointCLoRA backbones, and loaders for their local weight files.

The model is the stock timm object (``timm.create_model(arch, pretrained=False)``): nothing
is downloaded, and adapters, merges and saved files work on timm's own module names. The
papers' weights are Google's original ImageNet-21k ``ViT-B_16.npz``
(``vit_base_patch16_224``); this module converts that npz layout itself, and reads timm
``.pth`` / ``.safetensors`` state dicts through timm's ``checkpoint_filter_fn``. Every load
returns the same :class:`~pointclora.models.checkpoint.LoadReport` as the point backbones.
timm is imported here only, on first use, so point-cloud users never pay for it.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pointclora.adapters.registry import register_model_defaults

from .checkpoint import CheckpointError, CheckpointNotFoundError, LoadReport, read_state_dict
from .registry import register_backbone

logger = logging.getLogger("pointclora")

DEFAULT_ARCH = "vit_base_patch16_224"
HEAD = "head"
# What a stock timm ViT keeps trainable besides the adapters, and where adapters go.
VIT_ADAPTER_DEFAULTS = {
    "target_modules": ["attn.qkv", "attn.proj"],
    "blocks": r"blocks\.\d+",
    "head": [HEAD],
    "tokens": ["cls_token", "pos_embed"],
}
# by name: registering needs no timm import
register_model_defaults("timm.models.vision_transformer.VisionTransformer", VIT_ADAPTER_DEFAULTS)
# Normalisation of the original Google weights (ImageNet-21k ViT-B_16.npz): inputs in [-1, 1].
GOOGLE_MEAN = GOOGLE_STD = (0.5, 0.5, 0.5)
WEIGHTS_HINT = (
    "the papers used Google's original ImageNet-21k ViT-B/16 weights, ViT-B_16.npz, from the "
    "google-research/vision_transformer release (gs://vit_models/imagenet21k/ViT-B_16.npz); "
    "timm .pth / .safetensors state dicts also load"
)
_POINT_PREFIXES = ("MAE_encoder.", "transformer_q.", "blocks.blocks.")


def _timm():
    import timm  # noqa: PLC0415 (lazy: only image users need timm)

    return timm


@register_backbone("timm_vit")
def build_vit(cls_dim: int = 1000, arch: str = DEFAULT_ARCH, img_size: int | None = None,
              patch_size: int | None = None, embed_dim: int | None = None,
              depth: int | None = None, num_heads: int | None = None,
              drop_path_rate: float = 0.1) -> nn.Module:
    """``model.name: timm_vit``: the stock timm ViT ``arch`` with a ``cls_dim``-way head.

    ``timm.create_model(..., pretrained=False)``: no download ever happens; weights come
    from ``model.pretrained`` through :func:`load_vit_weights`. ``img_size``,
    ``patch_size``, ``embed_dim``, ``depth``, ``num_heads`` override the architecture's
    values when set (small models for tests and the demo).
    """
    timm = _timm()
    if not timm.is_model(arch):
        close = timm.list_models(f"*{arch.split('_')[0]}*")[:8]
        raise ValueError(f"model.arch={arch!r} is not a timm architecture (e.g. {close})")
    sizes = dict(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                 num_heads=num_heads)
    return timm.create_model(arch, pretrained=False, num_classes=cls_dim,
                             drop_path_rate=drop_path_rate,
                             **{k: v for k, v in sizes.items() if v is not None})


# ---- Google's npz layout -----------------------------------------------------------------

def _npz_block_names(w: Mapping[str, np.ndarray], prefix: str) -> tuple[str, str, str, str]:
    """(attention, mlp, norm1, norm2) sub-names: original release (1, 3, 0, 2) or big_vision."""
    if f"{prefix}Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel" in w:
        return "MultiHeadDotProductAttention_1", "MlpBlock_3", "LayerNorm_0", "LayerNorm_2"
    return "MultiHeadDotProductAttention_0", "MlpBlock_0", "LayerNorm_0", "LayerNorm_1"


def npz_to_timm(w: Mapping[str, np.ndarray]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Google ViT npz arrays -> (timm state dict, npz keys not used).

    Flax Dense kernels are (in, out) -> transposed; the patch conv is HWIO -> OIHW; the
    attention's per-head query/key/value kernels (D, heads, head_dim) are flattened and
    stacked into timm's fused ``qkv``; the output kernel (heads, head_dim, D) into ``proj``.
    ``pre_logits`` (the in21k representation layer) has no place in timm's ViT and is left
    out, as timm does.
    """
    prefix = next((p for p in ("", "opt/target/", "params/")
                   if f"{p}embedding/kernel" in w), None)
    if prefix is None:
        raise KeyError("embedding/kernel")
    att, mlp, ln1, ln2 = _npz_block_names(w, prefix)
    used: set[str] = set()

    def get(key: str) -> np.ndarray:
        used.add(prefix + key)
        return np.asarray(w[prefix + key], dtype=np.float32)

    def t(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a))

    out = {
        "patch_embed.proj.weight": t(get("embedding/kernel").transpose(3, 2, 0, 1)),
        "patch_embed.proj.bias": t(get("embedding/bias")),
        "cls_token": t(get("cls")),
        "pos_embed": t(get("Transformer/posembed_input/pos_embedding")),
        "norm.weight": t(get("Transformer/encoder_norm/scale")),
        "norm.bias": t(get("Transformer/encoder_norm/bias")),
    }
    depth = len({m.group(1) for k in w if (m := re.match(
        rf"{re.escape(prefix)}Transformer/encoderblock_(\d+)/", k))})
    for i in range(depth):
        g, b = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
        for ln, name in ((ln1, "norm1"), (ln2, "norm2")):
            out[f"{b}{name}.weight"] = t(get(f"{g}{ln}/scale"))
            out[f"{b}{name}.bias"] = t(get(f"{g}{ln}/bias"))
        q, k, v = (get(f"{g}{att}/{n}/kernel") for n in ("query", "key", "value"))
        dim = q.shape[0]
        out[f"{b}attn.qkv.weight"] = t(np.concatenate([a.reshape(dim, -1).T for a in (q, k, v)]))
        out[f"{b}attn.qkv.bias"] = t(np.concatenate(
            [get(f"{g}{att}/{n}/bias").reshape(-1) for n in ("query", "key", "value")]))
        out[f"{b}attn.proj.weight"] = t(get(f"{g}{att}/out/kernel").reshape(-1, dim).T)
        out[f"{b}attn.proj.bias"] = t(get(f"{g}{att}/out/bias"))
        for j in (0, 1):
            out[f"{b}mlp.fc{j + 1}.weight"] = t(get(f"{g}{mlp}/Dense_{j}/kernel").T)
            out[f"{b}mlp.fc{j + 1}.bias"] = t(get(f"{g}{mlp}/Dense_{j}/bias"))
    if f"{prefix}head/kernel" in w:
        out[f"{HEAD}.weight"] = t(get("head/kernel").T)
        out[f"{HEAD}.bias"] = t(get("head/bias"))
    return out, sorted(set(w) - used)


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except Exception as err:  # zip, pickle-refusal and format errors alike
        raise CheckpointError(f"{path}: not a readable npz file ({type(err).__name__}: "
                              f"{err}); is the file complete?") from err


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file  # noqa: PLC0415

    try:
        return load_file(str(path), device="cpu")
    except Exception as err:
        raise CheckpointError(f"{path}: not a readable safetensors file "
                              f"({type(err).__name__}: {err}); is the file complete?") from err


def read_vit_state(path: str | Path, model: nn.Module, trust_pickle: bool = False
                   ) -> tuple[dict[str, torch.Tensor], list[str], str]:
    """(timm state dict, file keys left out, layout name) of a ViT weights file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(f"{path}: no such weights file. Nothing is downloaded at "
                                      f"run time: {WEIGHTS_HINT}.")
    if path.suffix == ".npz":
        arrays = _read_npz(path)
        try:
            state, left = npz_to_timm(arrays)
        except KeyError as err:
            raise CheckpointError(
                f"{path}: not a Google ViT npz (no {err.args[0]!r}); it holds "
                f"{sorted(arrays)[:5]}. Expected {WEIGHTS_HINT}.") from None
        return state, left, "Google ViT npz"
    raw = (_read_safetensors(path) if path.suffix == ".safetensors"
           else read_state_dict(path, trust_pickle))
    point = [k for k in raw if k.startswith(_POINT_PREFIXES)]
    if point:
        raise CheckpointError(
            f"{path}: a point-cloud backbone checkpoint (keys such as {point[0]}), not image "
            "ViT weights; use it with model.name point_mae / point_bert, or give "
            f"{WEIGHTS_HINT}.")
    from timm.models.vision_transformer import checkpoint_filter_fn  # noqa: PLC0415

    # timm's own filter: older timm layouts, pos_embed resampling to the model's grid
    state = checkpoint_filter_fn(dict(raw), model)
    return state, [], f"timm {path.suffix} state dict"


def _resample_pos_embed(state: dict[str, torch.Tensor], model: nn.Module) -> None:
    """Resample the file's position grid to the model's when the image sizes differ."""
    pos = state.get("pos_embed")
    if pos is None or pos.shape == model.pos_embed.shape:
        return
    from timm.layers import resample_abs_pos_embed  # noqa: PLC0415

    prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
    state["pos_embed"] = resample_abs_pos_embed(pos, model.patch_embed.grid_size,
                                                num_prefix_tokens=prefix)


def load_vit_weights(model: nn.Module, path: str | Path, strict: bool = True,
                     trust_pickle: bool = False) -> LoadReport:
    """Load ``ViT-B_16.npz`` or a timm state dict into a stock timm ViT, loudly.

    The head is loaded only when the file holds one of the model's shape (an in21k head of
    21,843 classes is ignored and the task head stays at its init). Any other missing or
    unexpected key raises :class:`CheckpointError` unless ``strict=False``; a shape
    mismatch or a file of another kind always does. Load before injecting adapters.
    """
    state, left, layout = read_vit_state(path, model, trust_pickle)
    _resample_pos_embed(state, model)
    own = model.state_dict()
    if not any(k in own for k in state if not k.startswith(HEAD + ".")):
        raise CheckpointError(f"{path}: no ViT weights found for {type(model).__name__} (keys "
                              f"{sorted(state)[:5]}); expected {WEIGHTS_HINT}.")
    ignored, notes = list(left), []
    if any(k.startswith("pre_logits") for k in left):
        notes.append("pre_logits (the in21k representation layer) is not part of timm's ViT "
                     "and is left out, as timm does")
    head_file = [k for k in state if k.startswith(HEAD + ".")]
    head_own = [k for k in own if k.startswith(HEAD + ".")]
    head_loaded = bool(head_file) and set(head_file) == set(head_own) and all(
        state[k].shape == own[k].shape for k in head_own)
    if head_file and not head_loaded:
        n = state.get(f"{HEAD}.bias", torch.empty(0)).shape[0]
        notes.append(f"head of {n} classes in the file skipped (the model's head has "
                     f"{own[HEAD + '.bias'].shape[0] if HEAD + '.bias' in own else 0}); it is "
                     "trained anew")
        ignored += head_file
        state = {k: v for k, v in state.items() if k not in head_file}
    bad = [f"{k} {list(v.shape)} in the file vs {list(own[k].shape)}"
           for k, v in state.items() if k in own and v.shape != own[k].shape]
    if bad:
        raise CheckpointError(f"{path}: shape mismatch for {len(bad)} key(s): "
                              f"{', '.join(bad[:5])}; is model.arch the architecture of the "
                              "file?")
    unexpected = [k for k in state if k not in own]
    absent = [k for k in own if k not in state]
    expected = [k for k in absent if k in head_own]
    missing = [k for k in absent if k not in expected]
    if strict and (missing or unexpected):
        raise CheckpointError(
            f"{path} ({layout}) does not match {type(model).__name__}: missing "
            f"{len(missing)} key(s) {missing[:5]}, unexpected {len(unexpected)} key(s) "
            f"{unexpected[:5]}. Pass strict=False to load the matching part only.")
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    if layout == "Google ViT npz":
        notes.append("normalise inputs with mean = std = 0.5 for Google's original weights")
        model.pretrained_cfg = {**getattr(model, "pretrained_cfg", {}), "mean": GOOGLE_MEAN,
                                "std": GOOGLE_STD, "file": str(path)}
    report = LoadReport(path=str(path), layout=layout, loaded=[k for k in own if k in state],
                        missing=missing, expected_missing=expected, unexpected=unexpected,
                        ignored=ignored, head_loaded=head_loaded, notes=notes)
    logger.info("%s", report)
    if missing or unexpected:
        logger.warning("%s: %d missing and %d unexpected key(s)", path, len(missing),
                       len(unexpected))
    return report


build_vit.load_weights = load_vit_weights  # build_model loads model.pretrained with it


def normalization_warning(cfg: dict) -> str | None:
    """What to tell a run that feeds Google's npz weights inputs normalised otherwise than
    they were trained on (mean = std = 0.5); None when nothing is wrong."""
    model, data = cfg["model"], cfg.get("data") or {}
    if model.get("name") != "timm_vit" or not str(model.get("pretrained") or "").endswith(".npz"):
        return None
    mean, std = data.get("mean", GOOGLE_MEAN), data.get("std", GOOGLE_STD)
    if tuple(mean) == GOOGLE_MEAN and tuple(std) == GOOGLE_STD:
        return None
    return (f"data.mean {list(mean)}, data.std {list(std)}: Google's original weights "
            f"({model['pretrained']}) expect inputs normalised with mean = std = 0.5; set "
            "data.mean and data.std to [0.5, 0.5, 0.5]")
