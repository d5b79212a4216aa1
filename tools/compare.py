"""Train several methods with one config over a list of seeds; write the comparison table.

    python tools/compare.py --config configs/scanobjectnn/pb_t50_rs.yaml \\
        --methods full linear lora clora adapter adapter:aoft=star vpt_deep idpt dapt pointgst \\
        --seeds 0 1 2 --out runs/compare_pb_t50_rs

A method is a registered name, optionally with options: ``name:key=value,key=value``
(values read as YAML). The config's own adapter options apply to its own method only.
Each (method, seed) trains in ``OUT/<method>/seed<seed>`` as tools/train.py would; the
table (``OUT/compare.md`` and ``OUT/compare.csv``) gives the mean and the population
standard deviation (ddof=0, as the few-shot summaries) of the test metric over the seeds,
the trainable parameters and the cost of the model as deployed (merged where the method
can merge).
"""
from __future__ import annotations

import argparse
import copy
import csv
import io
import re
import statistics
import sys
from pathlib import Path

import pointclora  # noqa: F401  (first: sets the OpenMP wait policy before torch loads)

# isort: split
import yaml

from pointclora.adapters import METHODS, resolve_options
from pointclora.analysis import build_adapted, complexity_report
from pointclora.analysis.report import example_input
from pointclora.config import add_override_argument, load_config
from pointclora.engine import cleanup, fit, init_distributed
from pointclora.engine.rundir import check_output_file

TABLE_NAMES = ("compare.md", "compare.csv")


def parse_method(spec: str) -> tuple[str, str, dict]:
    """``"adapter:aoft=star,bottleneck=16"`` -> (label, method, options), options checked."""
    name, _, rest = spec.partition(":")
    options = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"method {spec!r}: write options as key=value pairs separated by "
                             "commas, e.g. adapter:aoft=star,bottleneck=16")
        options[key.strip()] = yaml.safe_load(value)
    if name not in METHODS:
        raise ValueError(f"method {spec!r}: unknown method {name!r}; valid: {', '.join(METHODS)}")
    resolve_options(name, options)  # a bad option fails before anything trains
    return spec, name, options


def method_config(cfg: dict, method: str, options: dict, seed: int) -> dict:
    """``cfg`` with ``method`` and ``options`` as its adapter and ``seed`` as its seed; the
    config's adapter options carry over to its own method only."""
    cfg = copy.deepcopy(cfg)
    own = dict(cfg["adapter"])
    own_method = own.pop("method")
    cfg["adapter"] = {"method": method, **(own if method == own_method else {}), **options}
    cfg["train"]["seed"] = seed
    return cfg


def run_dir(out: Path, label: str, seed: int) -> Path:
    return out / re.sub(r"[^A-Za-z0-9_.=+-]", "_", label) / f"seed{seed}"


def _cost(cfg: dict) -> dict:
    """Parameters and cost of the deployed model; a cost that cannot be measured is
    reported as such (the trained results are kept either way)."""
    try:
        report = complexity_report(build_adapted(cfg), example_input(cfg["data"]),
                                   executed=False)
    except (ValueError, RuntimeError, KeyError) as err:
        return {"cost_error": f"{type(err).__name__}: {err}"}
    deployed = report["merged"] or report
    return {"gflops": deployed["gflops"], "gmacs_modules": deployed["gmacs_modules"],
            "mergeable": report["mergeable"]}


def compare(cfg: dict, methods: list[tuple[str, str, dict]], seeds: list[int], out: Path,
            info, metric: str = "best", exist_ok: bool = False) -> list[dict]:
    """Train every (method, seed); one row per method with the metric over the seeds."""
    rows = []
    for label, method, options in methods:
        values, metric_name, params = [], None, None
        for seed in seeds:
            run_cfg = method_config(cfg, method, options, seed)
            metrics = fit(run_cfg, run_dir(out, label, seed), info, exist_ok=exist_ok)
            metric_name = f"{metric}_{metrics['best_metric']}"
            values.append(float(metrics[metric_name]))
            params = metrics["parameters"]
        rows.append({
            "method": label, "metric": metric_name, "values": values,
            "mean": statistics.fmean(values), "std": statistics.pstdev(values),
            "params_trainable": params["trainable"],
            "params_trainable_no_head": params["trainable_no_head"],
            **_cost(method_config(cfg, method, options, seeds[0])),
        })
    return rows


def _fmt(value, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def markdown(rows: list[dict], title: str) -> str:
    metric = rows[0]["metric"]
    lines = [title, "",
             f"| method | {metric} mean | std | seeds | trainable params (M) | w/o head (M) "
             "| GFLOPs (deployed) | GMACs modules | mergeable |",
             "|---|---:|---:|---|---:|---:|---:|---:|:---:|"]
    for r in rows:
        mergeable = {True: "yes", False: "no"}.get(r.get("mergeable"), "n/a")
        lines.append(
            f"| {r['method']} | {r['mean']:.2f} | {r['std']:.2f} "
            f"| {', '.join(f'{v:.2f}' for v in r['values'])} "
            f"| {r['params_trainable'] / 1e6:.3f} | {r['params_trainable_no_head'] / 1e6:.3f} "
            f"| {_fmt(r.get('gflops'), '.3f')} | {_fmt(r.get('gmacs_modules'), '.3f')} "
            f"| {mergeable} |")
    notes = [f"- {r['method']}: cost not measured ({r['cost_error']})"
             for r in rows if "cost_error" in r]
    lines += ["", "std: population standard deviation over the seeds (ddof=0). GFLOPs: fvcore "
              "convention, one sample; GMACs modules: the thop-style convention of published "
              "figures; both for the model as deployed (merged where the method can merge).",
              *notes]
    return "\n".join(lines) + "\n"


def to_csv(rows: list[dict]) -> str:
    fields = ["method", "metric", "mean", "std", "values", "params_trainable",
              "params_trainable_no_head", "gflops", "gmacs_modules", "mergeable"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({**r, "values": " ".join(f"{v:.4f}" for v in r["values"])})
    return buffer.getvalue()


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="YAML run config shared by every row")
    add_override_argument(parser)
    parser.add_argument("--methods", nargs="+", required=True,
                        help="methods, each NAME or NAME:key=value,key=value")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="default: 0")
    parser.add_argument("--out", required=True, type=Path, help="folder of the runs and tables")
    parser.add_argument("--metric", choices=("best", "final"), default="best",
                        help="the test metric at the best epoch (the papers') or the last one")
    parser.add_argument("--exist-ok", action="store_true",
                        help="start over runs already in OUT (old folders are moved aside) and "
                        "replace its tables")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if available")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        methods = [parse_method(spec) for spec in args.methods]
        labels = [label for label, _, _ in methods]
        if len(set(labels)) < len(labels) or len(set(args.seeds)) < len(args.seeds):
            raise ValueError("--methods and --seeds must not repeat an entry")
        cfg = load_config(args.config, args.overrides)
        args.out.mkdir(parents=True, exist_ok=True)
        tables = [check_output_file(args.out / name, lambda _: args.exist_ok, "table",
                                    "pass --exist-ok to replace it, or choose another --out")
                  for name in TABLE_NAMES]
        info = init_distributed(args.device)
        try:
            rows = compare(cfg, methods, args.seeds, args.out, info, args.metric, args.exist_ok)
        finally:
            cleanup()
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if info.is_main:
        m, d = cfg["model"], cfg["data"]
        title = (f"{m['name']} on {d['name']}, {len(args.seeds)} seed(s) "
                 f"({' '.join(map(str, args.seeds))}), config {args.config}")
        table = markdown(rows, title)
        tables[0].write_text(table)
        tables[1].write_text(to_csv(rows))
        print(table, end="")
        print(f"(written to {tables[0]} and {tables[1]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
