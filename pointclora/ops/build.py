"""Compile the C++/CUDA kernels on first use and cache them across runs.

Each extension is built with ``torch.utils.cpp_extension`` into
``<cache>/ops-<kind>-<key>/``, where ``key`` hashes the sources, the compiler flags, the
torch/CUDA/Python versions and (for CUDA) the target architectures, so a changed source
or a torch upgrade gets a fresh build and an unchanged one loads in milliseconds without
touching a compiler. A ``BUILD_OK`` marker is written only after a complete build;
concurrent first uses (DataLoader workers, DDP ranks) are serialised by torch's file lock.

Ahead-of-time build (e.g. in a Docker image)::

    python -m pointclora.ops.build            # CPU kernels, plus CUDA when a GPU is visible
    python -m pointclora.ops.build cuda --arch 9.0   # compile for a GPU that is not here
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import hashlib
import logging
import os
import platform
import shutil
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


def find_cuda_home() -> str | None:
    """A CUDA toolkit with nvcc and headers: ``$CUDA_HOME``/``$CUDA_PATH``, nvcc on PATH, or
    ``/usr/local/cuda*`` (preferring the version torch was built with)."""
    def usable(root) -> bool:
        return root is not None and all(
            Path(root, *parts).is_file() for parts in (("bin", "nvcc"), ("include", "cuda.h")))

    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    wanted = f"/usr/local/cuda-{torch.version.cuda}" if torch.version.cuda else None
    candidates += [wanted, "/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]
    return next((str(c) for c in candidates if usable(c)), None)


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


def build(kind: str, arch: str | None = None, verbose: bool | None = None) -> Path:
    """Compile ``kind`` ("cpu" or "cuda") unless cached, load it into ``torch.ops`` and
    return the library path. ``arch`` (CUDA only) defaults to the visible GPUs.

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

    cpp_extension = _cpp_extension()
    directory.mkdir(parents=True, exist_ok=True)
    flags = _FLAGS[kind]
    what = f"{kind} kernels" + (f" for arch {arch}" if arch else "")
    print(f"pointclora.ops: compiling {what} (first use only; cached in {directory})",
          file=sys.stderr, flush=True)
    start = time.perf_counter()
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
    marker = directory / f"{_MARKER}.tmp{os.getpid()}"
    marker.write_text(f"{what}\ntorch {torch.__version__}\n"
                      f"seconds {time.perf_counter() - start:.1f}\n")
    os.replace(marker, directory / _MARKER)
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
        path = build(kind, arch=args.arch, verbose=args.verbose)
        print(f"{kind}: {path} ({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
