"""Run directories: one folder per run, never overwritten by accident."""
from __future__ import annotations

from pathlib import Path

CONFIG_NAME = "config.yaml"
CKPT_DIR = "checkpoints"
LAST_CKPT = "last.pth"
BEST_CKPT = "best.pth"


def default_output_dir(config_path: str | Path) -> Path:
    """`runs/<config file stem>` when the config sets no output_dir."""
    return Path("runs") / Path(config_path).stem


def prepare_run_dir(path: str | Path, resume: bool = False, exist_ok: bool = False) -> Path:
    """Create `path`, refusing one that holds files unless the run resumes or `exist_ok` is set."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"output path {path} exists and is not a directory")
    if resume:
        if not (path / CKPT_DIR / LAST_CKPT).is_file():
            raise FileNotFoundError(
                f"cannot resume: {path / CKPT_DIR / LAST_CKPT} does not exist; "
                "start the run without --resume"
            )
    elif path.is_dir() and any(p.is_file() for p in path.rglob("*")) and not exist_ok:
        raise FileExistsError(
            f"run directory {path} already holds a run; continue it with --resume, write "
            "elsewhere with --out DIR (or --set output_dir=DIR), or pass --exist-ok to start "
            "over in it (its files are replaced)"
        )
    path.mkdir(parents=True, exist_ok=True)
    return path
