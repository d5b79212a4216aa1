"""Cost of a configured model: parameters and FLOPs, before and after merging the adapter."""
from __future__ import annotations

import copy
import inspect

import torch
from torch import nn

from pointclora.adapters import METHODS, apply_adapter, merge_adapter, parameter_report
from pointclora.data.images import IMAGE_DATASETS
from pointclora.engine.build import build_datasets, model_config, resolve_config
from pointclora.models import BACKBONES, build_model

from .flops import fvcore_flops, module_macs, official_graph, sample_points


def resolve_model_config(cfg: dict) -> dict:
    """`cfg["model"]` without the pretrained file (costs do not depend on weights) and with
    `cls_dim` filled from the dataset when the config leaves it to the data, as training does."""
    cfg = copy.deepcopy(cfg)
    takes_classes = "cls_dim" in inspect.signature(BACKBONES[cfg["model"]["name"]]).parameters
    if takes_classes and cfg["model"].get("cls_dim") is None:
        try:
            cfg = resolve_config(cfg, build_datasets(cfg, ("test",)))
        except (OSError, ValueError) as err:
            raise ValueError(
                f"model.cls_dim is not set and the dataset could not tell it ({err}); "
                "set it, e.g. --set model.cls_dim=40"
            ) from err
    return {**model_config(cfg), "pretrained": None}


def build_adapted(cfg: dict, method: str | None = None) -> nn.Module:
    """Backbone of `cfg` with `method` applied (default: `adapter.method`), in eval mode.

    The config's adapter options apply when `method` is the config's method; other methods
    take their defaults.
    """
    options = dict(cfg["adapter"])
    cfg_method = options.pop("method")
    method = method or cfg_method
    if method not in METHODS:
        raise ValueError(f"unknown adapter method {method!r}; valid: {', '.join(METHODS)}")
    model = build_model(resolve_model_config(cfg))
    apply_adapter(model, method, **(options if method == cfg_method else {}))
    return model.eval()


def _costs(model: nn.Module, points: torch.Tensor, executed: bool) -> dict:
    with official_graph(model):
        flops = fvcore_flops(model, points)
        macs = module_macs(model, points)
    params = parameter_report(model)
    out = {
        "flops": flops.total,
        "gflops": flops.total / 1e9,
        "gmacs_modules": macs / 1e9,
        "params_total": params["total"],
        "params_trainable": params["trainable"],
        "params_trainable_no_head": params["trainable_no_head"],
        "flops_by_operator": flops.by_operator,
        "uncounted_ops": {op: {"count": n, "reason": why}
                          for op, (n, why) in flops.skipped.items()},
    }
    if executed:
        out["gflops_executed"] = fvcore_flops(model, points).total / 1e9
    return out


def example_input(cfg_data: dict) -> torch.Tensor:
    """One sample of the configured data: a cloud of `npoints` points, or for image datasets
    one image of `img_size` pixels."""
    if cfg_data["name"] in IMAGE_DATASETS:
        size = int(cfg_data.get("img_size", 224))
        return torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    return sample_points(cfg_data["npoints"])


def input_description(cfg: dict) -> str:
    """What one sample is, for report headers."""
    data, m = cfg["data"], cfg["model"]
    if data["name"] in IMAGE_DATASETS:
        return f"one {data.get('img_size', 224)}-pixel image, {m.get('arch')}"
    return f"one cloud of {data['npoints']} points, {m['num_group']} groups of {m['group_size']}"


@torch.no_grad()
def complexity_report(model: nn.Module, sample: int | torch.Tensor, executed: bool = True
                      ) -> dict:
    """Parameters and both FLOP conventions for one sample, unmerged and merged: a cloud of
    `sample` points, or the given input (`example_input`).

    FLOPs count the official graph (see `official_graph`); `gflops_executed` is fvcore on
    the forward this package actually runs. Merging happens on a copy.
    """
    device = next(model.parameters()).device
    points = (sample_points(sample, device=device) if isinstance(sample, int)
              else sample.to(device))
    if hasattr(model, "example_inputs"):  # models that take more than the cloud
        points = model.example_inputs(points)
    report = _costs(model.eval(), points, executed)
    try:
        merged = merge_adapter(copy.deepcopy(model)).eval()
    except NotImplementedError:  # prompts, nonlinear adapters: the adapted model is final
        report.update(mergeable=False, merged=None)
        return report
    merged_costs = _costs(merged, points, executed)
    report["mergeable"] = True
    report["merged"] = {k: v for k, v in merged_costs.items()
                        if k not in ("flops_by_operator", "uncounted_ops")}
    return report


def methods_table(cfg: dict, device: str | torch.device = "cpu") -> tuple[str, list[dict]]:
    """Markdown table of every adapter method on the config's backbone, and its rows."""
    sample = example_input(cfg["data"])
    rows, unfit = [], []
    for method in METHODS:
        try:
            model = build_adapted(cfg, method)
        except ValueError as err:  # a method this backbone cannot take (a point-only one)
            if method == cfg["adapter"]["method"]:
                raise
            unfit.append(f"{method} ({str(err).split(':')[0]})")
            continue
        report = complexity_report(model.to(device), sample, executed=False)
        rows.append({"method": method, **report})
    m = cfg["model"]
    lines = [
        f"Adapter methods on {m['name']} ({cfg['data']['name']}: {input_description(cfg)}, "
        f"{rows[0]['params_total']:,} parameters in the plain model).",
        "",
        "| method | trainable params (M, head incl.) | trainable w/o head (M) "
        "| GFLOPs unmerged | GFLOPs merged | mergeable | GMACs modules (as published) |",
        "|---|---:|---:|---:|---:|:---:|---:|",
    ]
    for r in rows:
        merged = r["merged"]
        final = merged or r  # what the deployed model costs
        lines.append(
            f"| {r['method']} | {r['params_trainable'] / 1e6:.3f} "
            f"| {r['params_trainable_no_head'] / 1e6:.3f} | {r['gflops']:.4f} "
            f"| {merged['gflops'] if merged else r['gflops']:.4f} "
            f"| {'yes' if merged else 'no'} | {final['gmacs_modules']:.3f} |"
        )
    lines += [
        "",
        "GFLOPs: fvcore convention (one multiply-add = one flop; attention matmuls, FPS/kNN "
        "distances and adapter weight deltas included) for one sample, official graph. "
        "Unmerged adapters form their weight delta once per forward pass whatever the batch "
        "size; merging removes that cost. A method that cannot merge (prompts, nonlinear "
        "adapters) keeps its unmerged cost. GMACs modules: the thop-style convention of the "
        "published figures (Point-MAE 4.8), of the deployed model (merged where possible). "
        "Trainable counts include cls_token/cls_pos where the method trains them.",
    ]
    if unfit:
        lines.append(f"Not applicable to this backbone: {', '.join(unfit)}.")
    return "\n".join(lines) + "\n", rows
