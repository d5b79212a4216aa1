"""Compile the C++/CUDA kernels on first use and cache them across runs.

Each extension is built with ``torch.utils.cpp_extension`` into
``<cache>/ops-<kind>-<key>/``, where ``key`` hashes the sources, the compiler flags, the
torch/CUDA/Python versions and (for CUDA) the target architectures, so a changed source
or a torch upgrade gets a fresh build and an unchanged one loads in milliseconds without
touching a compiler. A ``BUILD_OK`` marker is written only after a complete build, a
``BUILD_FAILED`` record (reason, toolkit, how to retry) after a failed one, so that other
processes fall back at once instead of compiling again; concurrent first uses (DataLoader
workers, DDP ranks) are serialised by torch's file lock.

Ahead-of-time build (e.g. in a Docker image)::

    python -m pointclora.ops.build            # CPU kernels, plus CUDA when a GPU is visible
                                              # (always retries a recorded failure)
    python -m pointclora.ops.build cuda --arch 9.0   # compile for a GPU that is not here
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

CSRC = Path(__file__).resolve().parent / "csrc"
KINDS = ("cpu", "cuda")
_FLAGS = {
    # -ffp-contract=off / --fmad=false: no fused multiply-add, so every backend computes the
    # same float32 distances and returns the same indices.
    "cpu": {"cflags": ["-O3", "-fopenmp", "-ffp-contract=off", "-Wno-psabi"],
            "ldflags": ["-fopenmp"]},
    "cuda": {"cflags": ["-O3"], "cuda_cflags": ["-O3", "--fmad=false"], "ldflags": []},
}
_MARKER = "BUILD_OK"
TOOLKIT_LINK, TOOLKIT_GLOB = "/usr/local/cuda", "/usr/local/cuda-*"  # where toolkits live
_FAILED = "BUILD_FAILED"  # JSON: why the build failed, with which toolkit, how to retry


def cache_root() -> Path:
    """``$POINTCLORA_CACHE_DIR``, else ``$XDG_CACHE_HOME/pointclora``, else
    ``~/.cache/pointclora``."""
    if os.environ.get("POINTCLORA_CACHE_DIR"):
        return Path(os.environ["POINTCLORA_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "pointclora"


def sources(kind: str) -> list[Path]:
    return sorted(p for p in (CSRC / kind).iterdir() if p.suffix in (".cpp", ".cu"))


def visible_cuda_arch() -> str | None:
    """Architectures of the visible GPUs as a TORCH_CUDA_ARCH_LIST, e.g. ``"9.0"``."""
    if not torch.cuda.is_available():
        return None
    caps = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
    return ";".join(f"{major}.{minor}" for major, minor in sorted(caps))


def _usable(root) -> bool:
    return root is not None and all(
        Path(root, *parts).is_file() for parts in (("bin", "nvcc"), ("include", "cuda.h")))


def _version_key(folder: str) -> tuple:
    """``/usr/local/cuda-12.10`` sorts above ``cuda-12.9`` and ``cuda-9.2`` below
    ``cuda-13.0``; folders without a version sort last."""
    match = re.search(r"cuda-(\d+)(?:\.(\d+))?", Path(folder).name)
    return (1, int(match[1]), int(match[2] or 0)) if match else (0, 0, 0)


def toolkit_version(root: str) -> tuple[int, int] | None:
    """``(major, minor)`` of the CUDA toolkit in ``root``, from ``version.json`` (CUDA 11.1+)
    or ``nvcc --version``; None when neither says."""
    try:
        text = json.loads(Path(root, "version.json").read_text())["cuda"]["version"]
    except (OSError, ValueError, KeyError, TypeError):
        try:
            text = subprocess.run([str(Path(root, "bin", "nvcc")), "--version"],
                                  capture_output=True, text=True, timeout=60).stdout
        except (OSError, subprocess.SubprocessError):
            return None
        text = (re.search(r"release (\d+\.\d+)", text) or [None, ""])[1]
    match = re.match(r"(\d+)\.(\d+)", text)
    return (int(match[1]), int(match[2])) if match else None


def _torch_cuda() -> tuple[int, int] | None:
    match = re.match(r"(\d+)\.(\d+)", torch.version.cuda or "")
    return (int(match[1]), int(match[2])) if match else None


def find_cuda_home() -> str | None:
    """The CUDA toolkit (a folder with bin/nvcc and include/cuda.h) to build with.

    ``$CUDA_HOME`` or ``$CUDA_PATH`` when set (the user's choice; :func:`build` rejects it
    if its major version differs from torch's). Otherwise, among nvcc on ``PATH``,
    ``/usr/local/cuda`` and ``/usr/local/cuda-X.Y`` (newest first), the first toolkit of
    exactly torch's CUDA version, else of its major version, else the first one found.
    """
    explicit = [os.environ.get(key) for key in ("CUDA_HOME", "CUDA_PATH")]
    chosen = next((c for c in explicit if _usable(c)), None)
    if chosen is not None:
        return str(chosen)
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    candidates += [TOOLKIT_LINK,
                   *sorted(glob.glob(TOOLKIT_GLOB), key=_version_key, reverse=True)]
    candidates = [c for c in dict.fromkeys(candidates) if _usable(c)]
    wanted = _torch_cuda()
    if wanted is not None:
        versions = {c: toolkit_version(c) for c in candidates}
        for match in (lambda v: v == wanted, lambda v: v is not None and v[0] == wanted[0]):
            found = next((c for c in candidates if match(versions[c])), None)
            if found is not None:
                return found
    return candidates[0] if candidates else None


def check_toolkit(home: str) -> None:
    """Refuse a toolkit whose CUDA major version differs from torch's: the JIT build would
    compile but the library would fail to load or run (torch checks this in setup.py
    builds only)."""
    have, want = toolkit_version(home), _torch_cuda()
    if have is not None and want is not None and have[0] != want[0]:
        raise RuntimeError(
            f"the CUDA toolkit in {home} is CUDA {have[0]}.{have[1]} but torch "
            f"{torch.__version__} was built with CUDA {torch.version.cuda}; set CUDA_HOME to "
            f"a CUDA {want[0]}.x toolkit")


def build_key(kind: str, arch: str | None = None) -> str:
    digest = hashlib.sha256()
    for path in sorted((CSRC / kind).iterdir()):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    parts = (repr(_FLAGS[kind]), torch.__version__, str(torch.version.cuda),
             sys.implementation.cache_tag, platform.machine(), str(arch))
    digest.update("\0".join(parts).encode())
    return digest.hexdigest()[:16]


def build_dir(kind: str, arch: str | None = None) -> Path:
    return cache_root() / f"ops-{kind}-{build_key(kind, arch)}"


def _cpp_extension():
    """``torch.utils.cpp_extension``, imported without its CUDA_HOME guess warning on
    machines without a GPU (the toolkit is located by :func:`find_cuda_home` instead)."""
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        import torch.utils.cpp_extension as cpp_extension
    finally:
        log.setLevel(level)
    return cpp_extension


@contextlib.contextmanager
def _build_environment(kind: str, arch: str | None):
    """PATH with the interpreter's bin (ninja from the venv), CUDA_HOME and the arch list."""
    cpp_extension = _cpp_extension()
    saved = {key: os.environ.get(key) for key in ("PATH", "TORCH_CUDA_ARCH_LIST", "CUDA_HOME")}
    saved_home = cpp_extension.CUDA_HOME
    os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), saved["PATH"] or ""])
    if kind == "cuda":
        home = find_cuda_home()
        if home is None:
            raise RuntimeError("no CUDA toolkit found (set CUDA_HOME to a folder with bin/nvcc)")
        check_toolkit(home)
        # cpp_extension resolved CUDA_HOME once at import; point it at the toolkit found here.
        os.environ["CUDA_HOME"] = cpp_extension.CUDA_HOME = home
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch
    try:
        yield
    finally:
        cpp_extension.CUDA_HOME = saved_home
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _toolkit(kind: str) -> str | None:
    return find_cuda_home() if kind == "cuda" else None


def failed_build(kind: str, arch: str | None = None) -> dict | None:
    """The recorded failure of this build (same key as a success), or None. A failure
    recorded with another CUDA toolkit than the one found now does not count: changing
    CUDA_HOME is a retry."""
    path = build_dir(kind, arch) / _FAILED
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("toolkit") != _toolkit(kind):
        return None
    return {**record, "marker": str(path)}


def _record_failure(directory: Path, kind: str, what: str, err: Exception) -> str:
    """Write ``BUILD_FAILED`` so other processes (DDP ranks, DataLoader workers, later runs)
    fall back at once instead of compiling again; return the one-line reason."""
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    errors = [line.strip() for line in lines if re.search(r"\berror\b\s*:", line, re.I)]
    reason = f"{type(err).__name__}: " + " | ".join((errors or lines or [""])[:3])[:600]
    retry = (f"delete {directory / _FAILED} or run `python -m pointclora.ops.build {kind}` "
             "(with POINTCLORA_BUILD_VERBOSE=1 to see the compiler output)")
    record = {"what": what, "reason": reason, "toolkit": _toolkit(kind),
              "torch": torch.__version__, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
              "retry": retry}
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f"{_FAILED}.tmp{os.getpid()}"
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, directory / _FAILED)
    return reason


def build(kind: str, arch: str | None = None, verbose: bool | None = None,
          retry: bool = False) -> Path:
    """Compile ``kind`` ("cpu" or "cuda") unless cached, load it into ``torch.ops`` and
    return the library path. ``arch`` (CUDA only) defaults to the visible GPUs.

    A failed build is recorded in ``BUILD_FAILED`` beside where the library would be; later
    calls raise its reason at once unless ``retry`` is true.

    Raises RuntimeError (with the compiler's reason) when the build is impossible.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if kind == "cuda":
        if torch.version.cuda is None:
            raise RuntimeError(f"torch {torch.__version__} is not a CUDA build")
        arch = arch or visible_cuda_arch()
        if arch is None:
            raise RuntimeError("no GPU visible to pick an architecture; pass arch='9.0' etc.")
    else:
        arch = None
    if verbose is None:
        verbose = os.environ.get("POINTCLORA_BUILD_VERBOSE", "0") == "1"
    directory = build_dir(kind, arch)
    name = f"pointclora_{kind}_{directory.name.rsplit('-', 1)[-1]}"
    library = directory / f"{name}.so"
    if (directory / _MARKER).is_file() and library.is_file():
        torch.ops.load_library(str(library))
        return library
    what = f"{kind} kernels" + (f" for arch {arch}" if arch else "")
    failed = None if retry else failed_build(kind, arch)
    if failed is not None:
        raise RuntimeError(f"building the {what} failed on {failed.get('time')} "
                           f"({failed.get('reason')}); to retry, {failed.get('retry')}")

    cpp_extension = _cpp_extension()
    directory.mkdir(parents=True, exist_ok=True)
    flags = _FLAGS[kind]
    print(f"pointclora.ops: compiling {what} (first use only; cached in {directory})",
          file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        with _build_environment(kind, arch):
            cpp_extension.load(
                name=name,
                sources=[str(p) for p in sources(kind)],
                # Copies: cpp_extension appends to these lists, which would change build_key.
                extra_cflags=list(flags["cflags"]),
                extra_cuda_cflags=list(flags.get("cuda_cflags", [])),
                extra_ldflags=list(flags["ldflags"]),
                build_directory=str(directory),
                is_python_module=False,
                verbose=verbose,
            )
    except Exception as err:  # compiler, toolkit, ninja, loader
        reason = _record_failure(directory, kind, what, err)
        raise RuntimeError(f"building the {what} failed ({reason}); details are in "
                           f"{directory / _FAILED}") from err
    marker = directory / f"{_MARKER}.tmp{os.getpid()}"
    marker.write_text(f"{what}\ntorch {torch.__version__}\n"
                      f"seconds {time.perf_counter() - start:.1f}\n")
    os.replace(marker, directory / _MARKER)
    (directory / _FAILED).unlink(missing_ok=True)
    return library


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pointclora.ops.build", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kinds", nargs="*", metavar="{cpu,cuda}",
                        help="what to build (default: cpu, and cuda when a GPU is visible)")
    parser.add_argument("--arch", help="TORCH_CUDA_ARCH_LIST for the cuda build, e.g. 9.0")
    parser.add_argument("--verbose", action="store_true", help="show the compiler output")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.kinds) - set(KINDS))
    if unknown:
        parser.error(f"unknown kind(s) {unknown}; choose from {KINDS}")
    kinds = args.kinds or ["cpu"] + (["cuda"] if visible_cuda_arch() else [])
    for kind in kinds:
        start = time.perf_counter()
        path = build(kind, arch=args.arch, verbose=args.verbose, retry=True)
        print(f"{kind}: {path} ({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
