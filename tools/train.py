"""Fine-tune a backbone with an adapter as a config says; report the test accuracy.

    python tools/train.py --config configs/scanobjectnn/pb_t50_rs.yaml
    python tools/train.py --config configs/demo.yaml --set train.epochs=5 --out runs/try
    python tools/train.py --config configs/modelnet40/fewshot.yaml --folds 0-9
    torchrun --nproc_per_node 4 tools/train.py --config configs/modelnet40/1k.yaml
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

import yaml

from pointclora.config import (
    TRUST_PICKLE_WARNING,
    add_override_argument,
    add_trust_pickle_argument,
    load_config,
)
from pointclora.engine import (
    TrainingInterrupted,
    cleanup,
    default_output_dir,
    fit,
    init_distributed,
    parse_folds,
    run_folds,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="YAML config file (required unless --list-configs)")
    add_override_argument(parser)
    parser.add_argument("--out", help="run directory (default: output_dir of the config, "
                        "else runs/<config name>)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in the run directory from checkpoints/last.pth")
    parser.add_argument("--exist-ok", action="store_true",
                        help="start over in a run directory that holds a run (the old folder "
                        "is moved aside to NAME.old-<time>, never deleted)")
    add_trust_pickle_argument(parser)
    parser.add_argument("--folds", help="few-shot: train these folds (e.g. 0-9) one after "
                        "another and write summary.json with mean and std")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if available")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (bases, defaults, --set) and exit")
    parser.add_argument("--list-configs", action="store_true",
                        help="list the shipped configs with one line each and exit")
    args = parser.parse_args(argv)
    if not args.config and not args.list_configs:
        parser.error("--config is required (see --list-configs)")
    if args.resume and args.exist_ok:
        parser.error("--resume continues a run, --exist-ok starts over: choose one")
    return args


def list_configs(root: Path = CONFIGS) -> str:
    """One line per shipped config: its path and the first line of its header comment."""
    lines = []
    for path in sorted(p for p in root.rglob("*.yaml") if "_base_" not in p.parts):
        first = path.read_text().splitlines()[:1]
        about = first[0].lstrip("# ").strip() if first and first[0].startswith("#") else ""
        lines.append(f"{path.relative_to(root.parent).as_posix():<36} {about}")
    return "\n".join(lines)


def resume_command(argv: list[str], run_dir: Path, resumable: bool) -> str:
    """The command that continues an interrupted run (restarts it when nothing was saved)."""
    args = [a for a in argv if a not in ("--resume", "--exist-ok")]
    if not any(a == "--out" or a.startswith("--out=") for a in args):
        args += ["--out", str(run_dir)]
    if resumable:
        args.append("--resume")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    launcher = ["torchrun", "--nproc_per_node", str(world)] if world > 1 else ["python"]
    tool = os.path.relpath(__file__)
    tool = tool if not tool.startswith("..") else os.path.abspath(__file__)
    return shlex.join([*launcher, tool, *args])


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.list_configs:
        print(list_configs())
        return 0
    try:
        cfg = load_config(args.config, args.overrides)
        run_dir = Path(args.out or cfg["output_dir"] or default_output_dir(args.config))
        if args.print_config:  # nothing is created: no run folder, no training
            yaml.safe_dump(dict(cfg, output_dir=str(run_dir)), sys.stdout, sort_keys=False)
            return 0
        if args.trust_pickle:
            print(TRUST_PICKLE_WARNING, file=sys.stderr)
        info = init_distributed(args.device)
        try:
            if args.folds:
                run_folds(cfg, run_dir, parse_folds(args.folds), info, resume=args.resume,
                          exist_ok=args.exist_ok, trust_pickle=args.trust_pickle)
            else:
                fit(cfg, run_dir, info, resume=args.resume, exist_ok=args.exist_ok,
                    trust_pickle=args.trust_pickle)
        finally:
            cleanup()
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except TrainingInterrupted as err:  # Ctrl-C or SIGTERM: no traceback, the way back
        if os.environ.get("RANK", "0") == "0":
            # A few-shot run always resumes: finished folds are kept, the others (re)start.
            resumable = err.resumable or bool(args.folds)
            how = "continue with" if resumable else "nothing to resume; start again with"
            print(f"{err}\n{how}:\n  {resume_command(argv, run_dir, resumable)}",
                  file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:  # before the run started: nothing was written
        print("interrupted before training started", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
