"""Compile (not run) the CUDA kernels wherever nvcc and a CUDA build of torch exist, so a
syntax or API error fails CI even on machines without a GPU. The build lands in the
regular cache (~/.cache/pointclora or $POINTCLORA_CACHE_DIR): the first run takes about
half a minute, later runs a second."""
import time

import pytest
import torch

from pointclora.ops import build


@pytest.mark.cuda_build
@pytest.mark.timeout(1800)
def test_cuda_sources_compile():
    if torch.version.cuda is None:
        pytest.skip(f"torch {torch.__version__} is not a CUDA build")
    if build.find_cuda_home() is None:
        pytest.skip("no CUDA toolkit with nvcc (CUDA_HOME, nvcc on PATH or /usr/local/cuda*)")
    # The GPU that is present, else one modern architecture for the compile check only.
    arch = build.visible_cuda_arch() or "9.0"

    start = time.perf_counter()
    library = build.build("cuda", arch=arch)
    first = time.perf_counter() - start
    assert library.is_file() and (library.parent / "BUILD_OK").is_file()
    assert library.parent == build.build_dir("cuda", arch)

    start = time.perf_counter()
    assert build.build("cuda", arch=arch) == library
    assert time.perf_counter() - start < 5.0, "a cached build must not recompile"

    ops = torch.ops.pointclora_cuda  # registered by the library, callable without a GPU
    assert ops.knn_max_k() == 128
    assert hasattr(ops, "furthest_point_sample") and hasattr(ops, "knn")
    print(f"cuda build for arch {arch}: {first:.1f} s (cached: {library.parent})")


def test_build_key_tracks_inputs():
    """A different architecture or kind gets its own cache folder; the same inputs reuse it."""
    assert build.build_dir("cuda", "9.0") == build.build_dir("cuda", "9.0")
    assert build.build_dir("cuda", "9.0") != build.build_dir("cuda", "8.0")
    assert build.build_dir("cuda", "9.0") != build.build_dir("cpu")
    assert build.build_dir("cpu").parent == build.cache_root()


def test_cache_root_env(monkeypatch, tmp_path):
    monkeypatch.setenv("POINTCLORA_CACHE_DIR", str(tmp_path))
    assert build.cache_root() == tmp_path
    monkeypatch.delenv("POINTCLORA_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert build.cache_root() == tmp_path / "xdg" / "pointclora"


def test_unknown_kind_is_rejected():
    with pytest.raises(ValueError, match="kind must be one of"):
        build.build("rocm")
