"""pointclora.ops against independent references: a literal loop of the pointnet2_ops FPS
kernel, brute-force kNN with a stable sort, and explicit gathers."""
import contextlib

import numpy as np
import pytest
import torch

from pointclora import ops
from pointclora.ops import backends, build, torch_impl


def reference_fps(cloud: np.ndarray, npoint: int) -> list[int]:
    """The pointnet2_ops kernel as one sequential scan in float32 (ties: the strict `>`
    keeps the first, i.e. lowest, index)."""
    pts = cloud.astype(np.float32)
    temp = np.full(len(pts), 1e10, dtype=np.float32)
    picks, old = [0], 0
    for _ in range(1, npoint):
        x1, y1, z1 = pts[old]
        best, besti = np.float32(-1), 0
        for k, (x2, y2, z2) in enumerate(pts):
            mag = x2 * x2 + y2 * y2 + z2 * z2
            if float(mag) <= 1e-3:  # the kernel compares the float with a double
                continue
            d = (x2 - x1) * (x2 - x1) + (y2 - y1) * (y2 - y1) + (z2 - z1) * (z2 - z1)
            d2 = min(d, temp[k])
            temp[k] = d2
            if d2 > best:
                best, besti = d2, k
        old = besti
        picks.append(old)
    return picks


def reference_knn(ref: np.ndarray, query: np.ndarray, k: int):
    """Squared distances written out in float32, then a stable sort (ties: lower index)."""
    r, q = ref.astype(np.float32), query.astype(np.float32)
    diff = [r[None, :, a] - q[:, None, a] for a in range(3)]
    d = diff[0] * diff[0] + diff[1] * diff[1] + diff[2] * diff[2]
    idx = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, idx, axis=1), idx


def clouds(rng, n: int) -> dict[str, np.ndarray]:
    """Random, tie-heavy (a coarse grid plus repeated points) and near-origin clouds."""
    random = rng.standard_normal((n, 3)).astype(np.float32)
    grid = rng.integers(-3, 4, size=(n, 3)).astype(np.float32)
    grid[n // 2:] = grid[: n - n // 2]  # exact duplicates
    radius = np.sqrt(rng.uniform(0.0, 3e-3, size=(n, 1))).astype(np.float32)
    direction = rng.standard_normal((n, 3)).astype(np.float32)
    near = direction / np.linalg.norm(direction, axis=1, keepdims=True) * radius
    near[: n // 10] = 0.0
    return {"random": random, "ties": grid, "near_origin": near.astype(np.float32)}


def threshold_point() -> np.ndarray:
    """A point whose float32 x^2+y^2+z^2 equals float32(1e-3) exactly: just above the
    double 1e-3, so pointnet2_ops may pick it (a float32 comparison would not)."""
    target, rng = np.float32(1e-3), np.random.default_rng(0)
    while True:
        y, z = (np.float32(v) for v in rng.uniform(0, 0.02, size=2))
        rest = float(target) - float(y) ** 2 - float(z) ** 2
        if rest <= 0:
            continue
        x0 = np.float32(np.sqrt(rest))
        for x in (x0, np.nextafter(x0, np.float32(0)), np.nextafter(x0, np.float32(1))):
            if x * x + y * y + z * z == target:
                return np.array([x, y, z], dtype=np.float32)


def has_cpu_kernels() -> bool:
    return backends.kernels("cpu")[0] is not None


@pytest.fixture
def cpu_kernels():
    if not has_cpu_kernels():
        pytest.skip(f"no C++ kernels here: {backends.kernels('cpu')[1]}")


BACKENDS_CPU = ["auto", "torch"]


@pytest.mark.parametrize("kind", ["random", "ties", "near_origin"])
def test_fps_matches_kernel_reference(kind):
    rng = np.random.default_rng(1)
    batch = np.stack([clouds(rng, 160)[kind] for _ in range(3)])
    want = [reference_fps(cloud, 40) for cloud in batch]
    for backend in BACKENDS_CPU:
        got = ops.furthest_point_sample(torch.from_numpy(batch), 40, backend=backend)
        assert got.dtype == torch.long and got.shape == (3, 40)
        assert got.tolist() == want, backend


@pytest.mark.parametrize("backend", BACKENDS_CPU)
def test_fps_edge_semantics(backend):
    # The threshold point is pickable, the tiny one never is (index 1 is chosen second).
    tiny = np.array([0.0, 0.0, 1e-3], dtype=np.float32)
    cloud = np.stack([np.zeros(3, np.float32), threshold_point(), tiny])
    got = ops.furthest_point_sample(torch.from_numpy(cloud)[None], 3, backend=backend)
    assert got[0].tolist() == reference_fps(cloud, 3) == [0, 1, 1]
    # All points at the origin: index 0 repeats, as in pointnet2_ops.
    zeros = torch.zeros(2, 50, 3)
    assert ops.furthest_point_sample(zeros, 5, backend=backend).eq(0).all()
    # Beyond sqrt(1e10) every running distance stays at 1e10: ties to the lower index.
    far = np.random.default_rng(2).standard_normal((60, 3)).astype(np.float32) * 1e7
    got = ops.furthest_point_sample(torch.from_numpy(far)[None], 8, backend=backend)
    assert got[0].tolist() == reference_fps(far, 8)
    # npoint == N visits every distinct point once.
    pts = torch.randn(2, 64, 3)
    full = ops.furthest_point_sample(pts, 64, backend=backend)
    assert all(sorted(row.tolist()) == list(range(64)) for row in full)


@pytest.mark.parametrize("backend", BACKENDS_CPU)
@pytest.mark.parametrize("kind", ["random", "ties", "near_origin"])
def test_knn_matches_brute_force(backend, kind):
    rng = np.random.default_rng(3)
    ref = np.stack([clouds(rng, 300)[kind] for _ in range(2)])
    query = np.concatenate([ref[:, :40], clouds(rng, 25)[kind][None].repeat(2, 0)], axis=1)
    for k in (1, 7, 32, 300):
        dist, idx = ops.knn(torch.from_numpy(ref), torch.from_numpy(query), k, backend=backend)
        assert idx.dtype == torch.long and dist.dtype == torch.float32
        assert idx.shape == dist.shape == (2, 65, k)
        for b in range(2):
            want_d, want_i = reference_knn(ref[b], query[b], k)
            np.testing.assert_array_equal(idx[b].numpy(), want_i)
            np.testing.assert_array_equal(dist[b].numpy(), want_d)


@pytest.mark.parametrize("kind", ["random", "ties", "near_origin"])
def test_torch_fallback_equals_cpu_kernels(kind, cpu_kernels):
    rng = np.random.default_rng(4)
    for n, npoint, k in [(2048, 128, 32), (1000, 257, 5), (17, 17, 17)]:
        xyz = torch.from_numpy(np.stack([clouds(rng, n)[kind] for _ in range(3)]))
        fast = ops.furthest_point_sample(xyz, npoint, backend="kernels")
        assert torch.equal(fast, ops.furthest_point_sample(xyz, npoint, backend="torch"))
        centers = ops.gather_points(xyz, fast)
        fast_d, fast_i = ops.knn(xyz, centers, k, backend="kernels")
        slow_d, slow_i = ops.knn(xyz, centers, k, backend="torch")
        assert torch.equal(fast_i, slow_i) and torch.equal(fast_d, slow_d)


def test_cpu_kernels_do_not_depend_on_thread_count(cpu_kernels):
    xyz = torch.randn(5, 700, 3)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = (ops.furthest_point_sample(xyz, 50), ops.knn(xyz, xyz[:, :30], 9)[1])
        torch.set_num_threads(max(2, threads))
        many = (ops.furthest_point_sample(xyz, 50), ops.knn(xyz, xyz[:, :30], 9)[1])
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, many, strict=True))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_dtypes_are_computed_in_float32(dtype):
    xyz = torch.randn(2, 300, 3).to(dtype)
    as_float = xyz.float()
    assert torch.equal(ops.furthest_point_sample(xyz, 32),
                       ops.furthest_point_sample(as_float, 32))
    dist, idx = ops.knn(xyz, xyz[:, :10], 8)
    want_d, want_i = ops.knn(as_float, as_float[:, :10], 8)
    assert dist.dtype == torch.float32 and torch.equal(idx, want_i) and torch.equal(dist, want_d)


def test_gather_points_values_and_gradient():
    points = torch.randn(2, 10, 4, dtype=torch.float64, requires_grad=True)
    idx = torch.tensor([[[0, 3], [3, 9]], [[1, 1], [8, 2]]])
    out = ops.gather_points(points, idx)
    assert out.shape == (2, 2, 2, 4)
    for b in range(2):
        for g in range(2):
            for s in range(2):
                assert torch.equal(out[b, g, s], points[b, idx[b, g, s]])
    weights = torch.randn_like(out)
    (out * weights).sum().backward()
    want = torch.zeros_like(points)
    for b in range(2):
        for g in range(2):
            for s in range(2):
                want[b, idx[b, g, s]] += weights[b, g, s]
    assert torch.allclose(points.grad, want)
    leaf = points.detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda p: ops.gather_points(p, idx), (leaf,))
    # int32 indices (as pointnet2_ops returns) work too.
    assert torch.equal(ops.gather_points(points, idx.int()), out)


@pytest.mark.parametrize("call, match", [
    (lambda: ops.furthest_point_sample(torch.randn(2, 10, 3), 11), r"npoint=11 .*10"),
    (lambda: ops.furthest_point_sample(torch.randn(2, 10, 3), 0), r"npoint must be positive"),
    (lambda: ops.furthest_point_sample(torch.randn(2, 10, 3), -3), r"npoint.*\(2, 10, 3\)"),
    (lambda: ops.furthest_point_sample(torch.randn(10, 3), 4), r"xyz.*\(B, N, 3\).*\(10, 3\)"),
    (lambda: ops.furthest_point_sample(torch.randn(2, 10, 2), 4), r"xyz.*\(2, 10, 2\)"),
    (lambda: ops.knn(torch.randn(2, 10, 3), torch.randn(2, 4, 3), 11), r"k=11 .*10"),
    (lambda: ops.knn(torch.randn(2, 10, 3), torch.randn(2, 4, 3), 0), r"k must be positive"),
    (lambda: ops.knn(torch.randn(2, 10, 3), torch.randn(3, 4, 3), 2),
     r"\(2, 10, 3\).*\(3, 4, 3\).*batch"),
    (lambda: ops.knn(torch.randn(2, 10, 3), torch.randn(2, 4, 4), 2), r"query.*\(2, 4, 4\)"),
    (lambda: ops.gather_points(torch.randn(2, 10, 3), torch.tensor([[0, 10], [1, 2]])),
     r"\[0, 10\).*\[0, 10\]"),
    (lambda: ops.gather_points(torch.randn(2, 10, 3), torch.zeros(3, 4, dtype=torch.long)),
     r"\(3, 4\).*\(2, 10, 3\)"),
    (lambda: ops.furthest_point_sample(torch.randn(1, 10, 3), 2, backend="fast"), "backend"),
    (lambda: ops.knn(torch.randn(1, 10, 3), torch.randn(1, 2, 3), 2, backend="pointnet2"),
     "pointnet2"),
])
def test_bad_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_coordinates_are_rejected(bad):
    xyz = torch.randn(2, 10, 3)
    xyz[1, 4, 2] = bad
    with pytest.raises(ValueError, match=r"xyz of shape \(2, 10, 3\).*batch 1, point 4"):
        ops.furthest_point_sample(xyz, 3)
    with pytest.raises(ValueError, match=r"query .*NaN or inf"):
        ops.knn(torch.randn(2, 10, 3), xyz, 3)


def test_wrong_types_are_rejected():
    with pytest.raises(TypeError, match="npoint must be an int"):
        ops.furthest_point_sample(torch.randn(1, 10, 3), 2.0)
    with pytest.raises(TypeError, match="floating-point"):
        ops.knn(torch.randint(0, 5, (1, 10, 3)), torch.randn(1, 2, 3), 2)
    with pytest.raises(TypeError, match="integer tensor"):
        ops.gather_points(torch.randn(1, 10, 3), torch.zeros(1, 2))


def test_empty_batches():
    assert ops.furthest_point_sample(torch.randn(0, 10, 3), 4).shape == (0, 4)
    dist, idx = ops.knn(torch.randn(2, 10, 3), torch.randn(2, 0, 3), 3)
    assert dist.shape == idx.shape == (2, 0, 3)


def test_backend_info_reports_each_device():
    info = ops.backend_info()
    assert {"cpu", "cuda", "pointnet2_ops", "default_backend", "cache_dir"} <= info.keys()
    cpu = info["cpu"]
    assert cpu["furthest_point_sample"] in ("kernels", "torch")
    if has_cpu_kernels():
        assert cpu["furthest_point_sample"] == cpu["knn"] == "kernels"
        assert "cpu C++ kernels compiled" in cpu["reason"] and info["cache_dir"] in cpu["reason"]
        assert (build.build_dir("cpu") / "BUILD_OK").is_file()
    else:
        assert "fallback" in cpu["reason"]
    if not torch.cuda.is_available():
        assert info["cuda"]["knn"] is None and "no CUDA device" in info["cuda"]["reason"]


def test_backend_env_vars(monkeypatch):
    monkeypatch.setenv("POINTCLORA_OPS_BACKEND", "torch")
    info = ops.backend_info()
    assert info["cpu"]["furthest_point_sample"] == info["cpu"]["knn"] == "torch"
    assert "POINTCLORA_OPS_BACKEND=torch" in info["cpu"]["reason"]
    monkeypatch.setenv("POINTCLORA_OPS_BACKEND", "bogus")
    with pytest.raises(ValueError, match="POINTCLORA_OPS_BACKEND"):
        ops.backend_info()


def test_pointnet2_only_on_request(monkeypatch):
    """``auto`` never picks pointnet2_ops (thread-order ties, no device guard); by name it
    serves FPS on CUDA tensors, called under the tensor's device. No GPU needed: the
    dispatcher only looks at the device type."""
    seen = []

    def fake(xyz, npoint):
        seen.append(("call", xyz.device))
        return torch.zeros(xyz.shape[0], npoint, dtype=torch.int32)

    @contextlib.contextmanager
    def device_guard(device):
        seen.append(("guard", device))
        yield

    monkeypatch.setattr(backends, "_pointnet2", (fake, "pointnet2_ops importable"))
    monkeypatch.setattr(torch.cuda, "device", device_guard)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert backends.fps(cuda)[0] != "pointnet2" and backends.fps(cpu)[0] != "pointnet2"
    name, fn = backends.fps(cuda, "pointnet2")
    xyz = torch.zeros(2, 5, 3)
    assert name == "pointnet2" and fn(xyz, 3).dtype == torch.long
    assert seen == [("guard", xyz.device), ("call", xyz.device)]  # launched inside the guard
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        backends.fps(cpu, "pointnet2")
    # From the environment, "pointnet2" applies to FPS; kNN then uses auto.
    monkeypatch.setenv("POINTCLORA_OPS_BACKEND", "pointnet2")
    assert backends.fps(cuda)[0] == "pointnet2" and backends.knn(cpu, 3)[0] != "pointnet2"
    monkeypatch.setattr(backends, "_pointnet2", (None, "pointnet2_ops not importable"))
    with pytest.raises(RuntimeError, match="not importable"):
        backends.fps(cuda, "pointnet2")
    info = ops.backend_info()  # reports the missing library instead of raising
    assert info["cpu"]["furthest_point_sample"] in ("kernels", "torch")
    if torch.cuda.is_available():
        assert info["cuda"]["furthest_point_sample"] is None
        assert "not importable" in info["cuda"]["reason"]


@pytest.mark.parametrize("backend", BACKENDS_CPU)
def test_knn_serves_more_than_65535_clouds(backend):
    """Per-patch kNN over B x G flattened clouds: a batch beyond the CUDA grid's y limit."""
    rng = np.random.default_rng(6)
    ref = rng.integers(-2, 3, size=(70_000, 6, 3)).astype(np.float32)  # tie-heavy
    query = ref[:, :2] + np.float32(0.25)
    dist, idx = ops.knn(torch.from_numpy(ref), torch.from_numpy(query), 3, backend=backend)
    d = ((ref[:, None] - query[:, :, None]) ** 2).astype(np.float32)
    d = (d[..., 0] + d[..., 1]) + d[..., 2]
    want = np.argsort(d, axis=-1, kind="stable")[..., :3]
    np.testing.assert_array_equal(idx.numpy(), want)
    np.testing.assert_array_equal(dist.numpy(), np.take_along_axis(d, want, -1))


def group(xyz: torch.Tensor, num_group: int, group_size: int):
    """The Point-MAE grouping: FPS centers, their kNN patches, centred."""
    center = ops.gather_points(xyz, ops.furthest_point_sample(xyz, num_group))
    _, idx = ops.knn(xyz, center, group_size)
    return ops.gather_points(xyz, idx) - center.unsqueeze(2), center


def test_torch_compile_traces_the_grouping():
    """FPS and kNN are custom operators with fake implementations: the grouping compiles as
    one graph (no break at the ops) and gives the eager result."""
    torch._dynamo.reset()
    xyz = torch.from_numpy(clouds(np.random.default_rng(7), 256)["ties"])[None].repeat(2, 1, 1)
    xyz[1] += 0.5
    compiled = torch.compile(group, fullgraph=True)
    for got, want in zip(compiled(xyz, 24, 8), group(xyz, 24, 8), strict=True):
        assert torch.equal(got, want)
    with pytest.raises(ValueError, match="NaN or inf"):  # checks still run inside the ops
        compiled(torch.full_like(xyz, float("nan")), 24, 8)


def test_custom_operators_pass_opcheck():
    """Schema, fake implementation (shapes and dtypes), autograd and AOT dispatch of the
    registered operators, as torch's own checker sees them."""
    xyz = torch.randn(2, 50, 3)
    for op, args in [(torch.ops.pointclora.furthest_point_sample.default, (xyz, 8, "auto")),
                     (torch.ops.pointclora.knn.default, (xyz, xyz[:, :5].contiguous(), 4,
                                                         "auto"))]:
        result = torch.library.opcheck(op, args)
        assert set(result.values()) == {"SUCCESS"}, result


def assert_same_picks_up_to_near_ties(xyz: torch.Tensor, got: torch.Tensor,
                                      want: torch.Tensor, rtol: float = 1e-5) -> None:
    """FPS picks equal, except where another implementation took a different point at a
    step whose two candidates' running distances agree to ``rtol`` (pointnet2_ops breaks
    exact ties by thread and may fuse multiply-adds, flipping choices one ulp apart);
    after such a step the sequences legitimately diverge."""
    for b, (cloud, g, w) in enumerate(zip(xyz.double(), got, want, strict=True)):
        differ = (g != w).nonzero()
        if not len(differ):
            continue
        j = int(differ[0])
        running = ((cloud[:, None] - cloud[w[:j]][None]) ** 2).sum(-1).min(1).values
        a, c = float(running[g[j]]), float(running[w[j]])
        assert abs(a - c) <= rtol * max(a, c), (
            f"cloud {b}, pick {j}: {int(g[j])} at {a} vs {int(w[j])} at {c}")


def test_near_tie_comparison_accepts_only_near_ties():
    xyz = torch.tensor([[[0.0, 0, 0], [1, 0, 0], [-1, 0, 0], [0, 0.5, 0]]])
    want = torch.tensor([[0, 1, 3]])
    assert_same_picks_up_to_near_ties(xyz, torch.tensor([[0, 2, 3]]), want)  # exact tie
    with pytest.raises(AssertionError, match="pick 1"):
        assert_same_picks_up_to_near_ties(xyz, torch.tensor([[0, 3, 1]]), want)


@pytest.fixture
def cuda_ops():
    """The CUDA kernels, which must build where a GPU is present."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    cuda, reason = backends.kernels("cuda")
    assert cuda is not None, reason
    return cuda


# N per FPS path: 1, 2, 4, 8 and 16 points per thread in registers, then global scratch.
FPS_SIZES = [(300, 300), (1024, 64), (2048, 128), (4096, 256), (8192, 512), (9000, 64)]


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["random", "ties", "near_origin"])
def test_cuda_fps_matches_cpu(kind, cuda_ops):
    rng = np.random.default_rng(5)
    for n, npoint in FPS_SIZES:
        xyz = torch.from_numpy(np.stack([clouds(rng, n)[kind] for _ in range(4)]))
        want = ops.furthest_point_sample(xyz, npoint)
        got = ops.furthest_point_sample(xyz.cuda(), npoint)  # auto: our kernels
        assert torch.equal(got.cpu(), want), (n, npoint)
        if backends.pointnet2()[0] is not None and kind != "ties":
            # On grids, exact ties go by thread order there: other, equally valid picks.
            p2 = ops.furthest_point_sample(xyz.cuda(), npoint, backend="pointnet2").cpu()
            assert_same_picks_up_to_near_ties(xyz, p2, want)
    assert ops.backend_info()["cuda"]["furthest_point_sample"] == "kernels"


# k per kNN list size (16, 32, 64, 128), each with both variants; N < 32 (auto: thread).
KNN_CASES = [(2048, 128, 16), (2048, 128, 32), (1024, 64, 64), (300, 40, 100), (9000, 33, 128),
             (20, 20, 20)]


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["random", "ties", "near_origin"])
@pytest.mark.parametrize("variant", [0, 1, 2], ids=["auto", "thread", "warp"])
def test_cuda_knn_matches_cpu(kind, variant, cuda_ops):
    rng = np.random.default_rng(8)
    for n, m, k in KNN_CASES:
        ref = torch.from_numpy(np.stack([clouds(rng, n)[kind] for _ in range(3)]))
        query = torch.cat([ref[:, :m // 2], ref[:, -(m - m // 2):] + 0.01], dim=1)
        want_d, want_i = ops.knn(ref, query, k)
        got_d, got_i = cuda_ops.knn(ref.cuda(), query.cuda(), k, variant)
        assert torch.equal(got_i.cpu(), want_i), (n, m, k)
        assert torch.equal(got_d.cpu(), want_d), (n, m, k)
    # k > 128: the pure-torch path on the GPU, same result.
    ref = torch.randn(2, 400, 3)
    got = ops.knn(ref.cuda(), ref[:, :5].cuda(), 200)
    want = ops.knn(ref, ref[:, :5], 200)
    assert all(torch.equal(a.cpu(), b) for a, b in zip(got, want, strict=True))


@pytest.mark.gpu
@pytest.mark.parametrize("variant", [0, 1, 2], ids=["auto", "thread", "warp"])
def test_cuda_knn_serves_more_than_65535_clouds(variant, cuda_ops):
    ref = torch.from_numpy(np.random.default_rng(9).integers(-2, 3, size=(70_000, 40, 3))
                           .astype(np.float32))
    query = ref[:, :4] + 0.25
    want = ops.knn(ref, query, 5)
    got = cuda_ops.knn(ref.cuda(), query.cuda(), 5, variant)
    assert all(torch.equal(a.cpu(), b) for a, b in zip(got, want, strict=True))


@pytest.mark.gpu
def test_cuda_ops_run_on_a_non_default_stream(cuda_ops):
    xyz = torch.randn(8, 4096, 3)
    want_fps = ops.furthest_point_sample(xyz, 256)
    want_knn = ops.knn(xyz, xyz[:, :256], 32)[1]
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        # Produced, used and read back on `stream` only: a kernel launched on another
        # stream would race with the copy and read garbage.
        on_gpu = xyz.pin_memory().to("cuda", non_blocking=True)
        query = on_gpu[:, :256].contiguous()
        results = [ops.furthest_point_sample(on_gpu, 256), ops.knn(on_gpu, query, 32)[1]]
        results += [cuda_ops.knn(on_gpu, query, 32, variant)[1] for variant in (1, 2)]
        host = [r.to("cpu", non_blocking=True) for r in results]
    stream.synchronize()
    assert torch.equal(host[0], want_fps)
    assert all(torch.equal(h, want_knn) for h in host[1:])


@pytest.mark.gpu
def test_cuda_ops_on_a_second_device(cuda_ops):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    xyz = torch.randn(4, 2048, 3)
    want = ops.furthest_point_sample(xyz, 128), ops.knn(xyz, xyz[:, :64], 16)[1]
    with torch.cuda.device(0):  # the current device is not the tensors'
        on_1 = xyz.to("cuda:1")
        fps = ops.furthest_point_sample(on_1, 128)
        idx = ops.knn(on_1, on_1[:, :64], 16)[1]
        assert fps.device == idx.device == torch.device("cuda:1")
        if backends.pointnet2()[0] is not None:
            p2 = ops.furthest_point_sample(on_1, 128, backend="pointnet2")
            assert p2.device == on_1.device
            assert_same_picks_up_to_near_ties(xyz, p2.cpu(), want[0])
    assert torch.equal(fps.cpu(), want[0]) and torch.equal(idx.cpu(), want[1])


@pytest.mark.gpu
def test_cuda_grouping_under_torch_compile(cuda_ops):
    torch._dynamo.reset()
    xyz = torch.randn(4, 1024, 3, device="cuda")
    compiled = torch.compile(group, fullgraph=True)
    for got, want in zip(compiled(xyz, 64, 32), group(xyz, 64, 32), strict=True):
        assert torch.equal(got, want)


def test_torch_impl_knn_chunks_agree(monkeypatch):
    """The fallback bounds memory by splitting queries; the split must not change results."""
    ref, query = torch.randn(2, 200, 3), torch.randn(2, 90, 3)
    whole = torch_impl.knn(ref, query, 6)
    monkeypatch.setattr(torch_impl, "_KNN_CHUNK_ELEMENTS", 2 * 200 * 7)
    parts = torch_impl.knn(ref, query, 6)
    assert all(torch.equal(a, b) for a, b in zip(whole, parts, strict=True))
