"""Run directories: one folder per run, one process at a time, never overwritten by accident.

- A folder holding a run (a checkpoint, metrics, or any file the trainer did not write at
  start-up) is refused unless the run resumes (`resume`) or starts over (`exist_ok`).
- A start that failed before its first checkpoint (missing data or weights) left only its
  start-up files (`train.log`, `config.yaml`, `log.csv`, TensorBoard events): that is no run,
  so a retry goes ahead in the same folder (`train.log` keeps the failed attempt's lines).
- Starting over moves the old folder aside as `NAME.old-<timestamp>`; nothing is deleted
  and the new run starts in an empty folder, so files of two runs never mix.
- The folder is locked (`fcntl.flock` on `.lock`) for as long as the process lives; the
  kernel releases the lock when the process ends, however it ends, so a second process
  (a second `--resume`, say) is refused while the first runs.
- Temporary checkpoint files (`*.pth.tmp`) that a kill during a save left behind are
  removed once the lock is held (no other process can be writing them).
"""
from __future__ import annotations

import fcntl
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from .recorder import CSV_NAME, LOG_NAME, TB_DIR

CONFIG_NAME = "config.yaml"
CKPT_DIR = "checkpoints"
LAST_CKPT = "last.pth"
BEST_CKPT = "best.pth"
LOCK_NAME = ".lock"
TMP_SUFFIX = ".tmp"
STARTUP_FILES = (LOG_NAME, CONFIG_NAME, CSV_NAME, LOCK_NAME)

logger = logging.getLogger("pointclora")
_HELD: dict[Path, int] = {}  # run folder -> descriptor of its locked .lock (this process)


class RunLockedError(OSError):
    """Another process holds the run folder."""


def check_output_file(path: str | Path, is_own: Callable[[Path], bool] = lambda p: False,
                      what: str = "output",
                      hint: str = "choose another path (or remove it yourself)") -> Path:
    """Refuse, before any work, an output path that cannot be written or would replace a
    file the tool did not write itself (`is_own(path)` says whether an existing one is)."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{what} {path} is a folder; give a file name")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{what} {path}: the folder {path.parent} does not exist")
    if path.exists() and not is_own(path):
        raise FileExistsError(f"{what} {path} already exists and is left alone: {hint}")
    if not os.access(path.parent, os.W_OK):
        raise PermissionError(f"{what} {path}: the folder {path.parent} is not writable")
    return path


def default_output_dir(config_path: str | Path) -> Path:
    """`runs/<config file stem>` when the config sets no output_dir."""
    return Path("runs") / Path(config_path).stem


def _run_files(path: Path) -> list[Path]:
    """Files that make `path` a run (or a folder of the user's): all but start-up leftovers."""
    out = []
    for file in path.rglob("*"):
        if not file.is_file():
            continue
        parts = file.relative_to(path).parts
        if file.name in STARTUP_FILES or TB_DIR in parts or file.name.endswith(TMP_SUFFIX):
            continue
        out.append(file)
    return out


def lock_run_dir(path: str | Path) -> Path:
    """Hold `path/.lock` for the rest of this process; refuse if another process holds it."""
    path = Path(path).resolve()
    if path in _HELD:
        return path
    path.mkdir(parents=True, exist_ok=True)
    fd = os.open(path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RunLockedError(
            f"run directory {path} is in use by another process (it holds {path / LOCK_NAME}); "
            "wait for it to finish or stop it, then retry"
        ) from None
    _HELD[path] = fd
    return path


def release_run_dir(path: str | Path) -> None:
    """Give up this process's lock on `path` (it also ends with the process)."""
    fd = _HELD.pop(Path(path).resolve(), None)
    if fd is not None:
        os.close(fd)


def _move_aside(path: Path) -> Path:
    """Rename `path` to `path.old-<timestamp>` (a free name); returns the new name."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target, n = path.with_name(f"{path.name}.old-{stamp}"), 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.old-{stamp}-{n}")
    path.rename(target)
    return target


def prepare_run_dir(path: str | Path, resume: bool = False, exist_ok: bool = False) -> Path:
    """Create and lock `path` for a new run, a resumed one (`resume`) or a fresh start over an
    old one (`exist_ok`: the old folder is moved aside). Returns `path`."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"output path {path} exists and is not a directory")
    had_lock = (path / LOCK_NAME).exists()
    if path.is_dir():
        lock_run_dir(path)
    try:
        if resume and not (path / CKPT_DIR / LAST_CKPT).is_file():
            raise FileNotFoundError(
                f"cannot resume: {path / CKPT_DIR / LAST_CKPT} does not exist (the run never "
                "reached its first checkpoint); start the run without --resume"
            )
        held = [] if resume or not path.is_dir() else _run_files(path)
        if held and not exist_ok:
            raise FileExistsError(
                f"run directory {path} already holds a run ({held[0]}); continue it with "
                "--resume, write elsewhere with --out DIR (or --set output_dir=DIR), or pass "
                "--exist-ok to start over (the old folder is moved aside, not deleted)"
            )
    except FileExistsError:
        release_run_dir(path)
        if not had_lock:  # leave a folder we refuse as we found it
            (path / LOCK_NAME).unlink(missing_ok=True)
        raise
    if held:
        old = _move_aside(path)  # under the lock, which moves with the folder
        release_run_dir(path)
        logger.warning("started over: the earlier run in %s was moved to %s", path, old)
    lock_run_dir(path)
    for tmp in (path / CKPT_DIR).glob(f"*{TMP_SUFFIX}"):
        tmp.unlink()  # an interrupted save: the checkpoint it was replacing is intact
    return path
