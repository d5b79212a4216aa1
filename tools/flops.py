"""GFLOPs and parameter counts of a configured model, before and after merging its adapter.

    python tools/flops.py --config configs/scanobjectnn/pb_t50_rs.yaml
    python tools/flops.py --config configs/scanobjectnn/pb_t50_rs.yaml --json
    python tools/flops.py --config configs/scanobjectnn/pb_t50_rs.yaml --all-methods

One sample: a cloud of `data.npoints` points, or one image of `data.img_size` pixels
(docs/images.md). Two conventions (docs/tools.md):
fvcore (one multiply-add = one flop, attention matmuls included) and module
multiply-accumulates (thop-style, the convention of the published 4.8 GFLOPs).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pointclora  # noqa: F401  (first: sets the OpenMP wait policy before torch loads)

# isort: split
import torch

from pointclora.adapters import METHODS
from pointclora.analysis import build_adapted, complexity_report, methods_table
from pointclora.analysis.report import example_input, input_description
from pointclora.config import add_override_argument, load_config
from pointclora.engine.rundir import check_output_file


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="YAML run config")
    add_override_argument(parser)
    parser.add_argument("--method", choices=METHODS, help="default: the config's adapter.method")
    parser.add_argument("--all-methods", action="store_true",
                        help="one Markdown table of every adapter method on this backbone")
    parser.add_argument("--table-out", type=Path,
                        help="also write the --all-methods table to this file (default: print "
                        "only)")
    parser.add_argument("--overwrite", action="store_true",
                        help="let --table-out replace an existing file")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")
    parser.add_argument("--device", default="cpu", help="device for the traced forward pass")
    args = parser.parse_args(argv)
    if args.table_out and not args.all_methods:
        parser.error("--table-out writes the --all-methods table; add --all-methods")
    return args


def _fmt_row(name: str, unmerged, merged, fmt: str) -> str:
    shown = "-" if merged is None else format(merged, fmt)  # a method that cannot merge
    return f"  {name:<34}{format(unmerged, fmt):>16}{shown:>16}"


def format_report(cfg: dict, method: str, report: dict) -> str:
    m, merged = cfg["model"], report["merged"] or {}
    lines = [
        f"{m['name']} + {method} on {cfg['data']['name']}: {input_description(cfg)}",
        f"  {'':<34}{'unmerged':>16}{'merged':>16}",
        _fmt_row("GFLOPs (fvcore)", report["gflops"], merged.get("gflops"), ".3f"),
        _fmt_row("GMACs (modules, thop-style)", report["gmacs_modules"],
                 merged.get("gmacs_modules"), ".3f"),
        _fmt_row("GFLOPs as executed (fvcore)", report["gflops_executed"],
                 merged.get("gflops_executed"), ".3f"),
        _fmt_row("parameters", report["params_total"], merged.get("params_total"), ","),
        _fmt_row("trainable", report["params_trainable"], merged.get("params_trainable"), ","),
        _fmt_row("trainable without head", report["params_trainable_no_head"],
                 merged.get("params_trainable_no_head"), ","),
        "",
        "fvcore flops by operator (unmerged):",
    ]
    for op, n in sorted(report["flops_by_operator"].items(), key=lambda kv: -kv[1]):
        lines.append(f"  {op:<34}{n / 1e9:>10.4f} G")
    lines.append("operators fvcore left at zero, and why:")
    for op, info in report["uncounted_ops"].items():
        reason = info["reason"] or "NO DOCUMENTED REASON (please report this operator)"
        lines.append(f"  {op} ({info['count']}x): {reason}")
    lines.append("After merging, every parameter is trainable again (a plain backbone)."
                 if report["mergeable"] else
                 f"{method} cannot be merged (prompts or a nonlinear adapter): the adapted model "
                 "is what runs, at its unmerged cost.")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.table_out:  # before the work: never replace a file silently
            check_output_file(args.table_out, lambda _: args.overwrite, "--table-out",
                              "pass --overwrite to replace it, or choose another path")
        cfg = load_config(args.config, args.overrides)
        device = torch.device(args.device)
        if args.all_methods:
            table, rows = methods_table(cfg, device)
            if args.table_out:
                args.table_out.write_text(table)
            if args.json:
                print(json.dumps({"table": table, "methods": rows}, indent=2))
            else:
                print(table, end="")
                if args.table_out:
                    print(f"(written to {args.table_out})")
            return 0
        method = args.method or cfg["adapter"]["method"]
        model = build_adapted(cfg, method).to(device)
        report = complexity_report(model, example_input(cfg["data"]))
    except (ValueError, OSError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"config": args.config, "method": method,
                          "npoints": cfg["data"].get("npoints"), **report}, indent=2))
    else:
        print(format_report(cfg, method, report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
