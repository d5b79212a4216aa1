"""The kernel build: CUDA sources compile (not run) wherever nvcc and a CUDA build of torch
exist, so a syntax or API error fails CI even on machines without a GPU; toolkit choice;
the cache and the failure record. The build lands in the regular cache (~/.cache/pointclora
or $POINTCLORA_CACHE_DIR): the first run takes about half a minute, later runs a second."""
import json
import os

import pytest
import torch

from pointclora.ops import build


def forbid_compiling(monkeypatch):
    def compile_again(**kwargs):
        raise AssertionError(f"recompiled {kwargs['name']}")

    monkeypatch.setattr(build._cpp_extension(), "load", compile_again)


@pytest.mark.cuda_build
@pytest.mark.timeout(1800)
def test_cuda_sources_compile(monkeypatch):
    if torch.version.cuda is None:
        pytest.skip(f"torch {torch.__version__} is not a CUDA build")
    if build.find_cuda_home() is None:
        pytest.skip("no CUDA toolkit with nvcc (CUDA_HOME, nvcc on PATH or /usr/local/cuda*)")
    # The GPU that is present, else one modern architecture for the compile check only.
    arch = build.visible_cuda_arch() or "9.0"

    library = build.build("cuda", arch=arch, retry=True)  # this is the check: no old record
    assert library.is_file() and (library.parent / "BUILD_OK").is_file()
    assert library.parent == build.build_dir("cuda", arch)
    assert not (library.parent / "BUILD_FAILED").exists()

    # A cached build loads the same file and never reaches the compiler.
    stamp = library.stat().st_mtime_ns
    forbid_compiling(monkeypatch)
    assert build.build("cuda", arch=arch) == library
    assert library.stat().st_mtime_ns == stamp

    ops = torch.ops.pointclora_cuda  # registered by the library, callable without a GPU
    assert ops.knn_max_k() == 128
    assert hasattr(ops, "furthest_point_sample") and hasattr(ops, "knn")
    if not torch.cuda.is_available():  # registered for CUDA tensors only
        with pytest.raises(NotImplementedError, match="CPU"):
            ops.knn(torch.zeros(1, 4, 3), torch.zeros(1, 2, 3), 2)


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


def fake_toolkit(root, version: str):
    """A folder that looks like a CUDA toolkit of ``version`` (bin/nvcc, include/cuda.h)."""
    (root / "bin").mkdir(parents=True)
    (root / "include").mkdir()
    (root / "bin" / "nvcc").write_text("#!/bin/sh\nexit 1\n")
    os.chmod(root / "bin" / "nvcc", 0o755)
    (root / "include" / "cuda.h").write_text("")
    (root / "version.json").write_text(json.dumps({"cuda": {"version": f"{version}.1"}}))
    return str(root)


@pytest.fixture
def toolkits(monkeypatch, tmp_path):
    """Fake toolkits 9.2, 12.4, 13.0 and 13.1 under tmp_path; torch claims CUDA 13.0; nvcc on
    PATH is the 12.4 one; no CUDA_HOME."""
    homes = {v: fake_toolkit(tmp_path / f"cuda-{v}", v) for v in ("9.2", "12.4", "13.0", "13.1")}
    monkeypatch.setattr(build, "TOOLKIT_LINK", str(tmp_path / "cuda"))
    monkeypatch.setattr(build, "TOOLKIT_GLOB", str(tmp_path / "cuda-*"))
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setenv("PATH", os.pathsep.join([str(tmp_path / "cuda-12.4" / "bin"),
                                                os.environ.get("PATH", "")]))
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    return homes


def test_toolkit_matching_torch_beats_nvcc_on_path(toolkits, monkeypatch):
    assert build.toolkit_version(toolkits["12.4"]) == (12, 4)
    assert build.find_cuda_home() == toolkits["13.0"]
    # Without the exact version, the newest of the same major version, not 9.2 (which
    # sorts above 13.x as a string).
    monkeypatch.setattr(torch.version, "cuda", "13.2")
    assert build.find_cuda_home() == toolkits["13.1"]
    monkeypatch.setattr(torch.version, "cuda", "11.8")  # nothing matches: the PATH nvcc
    assert build.find_cuda_home() == toolkits["12.4"]
    monkeypatch.setenv("CUDA_HOME", toolkits["9.2"])  # an explicit choice is kept ...
    assert build.find_cuda_home() == toolkits["9.2"]


def test_toolkit_of_another_major_version_is_refused(toolkits):
    build.check_toolkit(toolkits["13.1"])  # minor versions may differ
    with pytest.raises(RuntimeError, match=r"CUDA 12\.4 but torch .* CUDA 13\.0.*CUDA_HOME"):
        build.check_toolkit(toolkits["12.4"])


def test_build_failure_is_recorded_for_other_processes(monkeypatch, tmp_path):
    """A failed build writes BUILD_FAILED (reason, how to retry); later calls raise that
    reason without compiling; retry=True compiles again and a success clears the record."""
    monkeypatch.setenv("POINTCLORA_CACHE_DIR", str(tmp_path))
    calls = []

    def failing_load(**kwargs):
        calls.append(kwargs["name"])
        raise RuntimeError("Error building extension:\nops_cpu.cpp:1: error: boom")

    monkeypatch.setattr(build._cpp_extension(), "load", failing_load)
    with pytest.raises(RuntimeError, match="boom"):
        build.build("cpu")
    record = json.loads((build.build_dir("cpu") / "BUILD_FAILED").read_text())
    assert "boom" in record["reason"] and "python -m pointclora.ops.build cpu" in record["retry"]
    with pytest.raises(RuntimeError, match=r"failed on .*boom.*to retry, delete .*BUILD_FAILED"):
        build.build("cpu")
    assert len(calls) == 1  # the second call did not compile

    monkeypatch.setattr(build._cpp_extension(), "load", lambda **kwargs: calls.append("ok"))
    library = build.build("cpu", retry=True)
    assert calls == [calls[0], "ok"]
    assert (library.parent / "BUILD_OK").is_file()
    assert not (library.parent / "BUILD_FAILED").exists()


def test_build_failure_with_another_toolkit_is_retried(toolkits, monkeypatch, tmp_path):
    monkeypatch.setenv("POINTCLORA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(build._cpp_extension(), "load",
                        lambda **kwargs: (_ for _ in ()).throw(RuntimeError("nvcc error")))
    with pytest.raises(RuntimeError, match="nvcc error"):
        build.build("cuda", arch="9.0")
    assert build.failed_build("cuda", "9.0")["toolkit"] == toolkits["13.0"]
    monkeypatch.setenv("CUDA_HOME", toolkits["13.1"])  # the user points at another toolkit
    assert build.failed_build("cuda", "9.0") is None
