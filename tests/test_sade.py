"""SADE: the Gram-matrix computation against the formula on explicit d_in x d_out matrices."""
import pytest
import torch
from torch.overrides import TorchFunctionMode

from pointclora.adapters import CLoRALinear, apply_adapter, regularization_loss, sade
from pointclora.models import PointMAE


def naive_sade(down, up, q, similarity, eps):
    """Forms every A_h = D_h Q_h U_h and the products the definition names."""
    total = 0.0
    p = down.shape[0]
    for j in range(q.shape[0]):
        parts = [down[h] @ q[j, h] @ up[h] for h in range(p)]
        for h in range(p):
            for k in range(p):
                if h == k:
                    continue
                a, b = parts[h], parts[k]
                if similarity == "cross_gram":
                    num = (a @ b.T).square().sum()
                elif similarity == "output_cov":
                    num = (a.T @ b).square().sum()
                else:
                    num = (a * b).sum().square()
                total = total + num / (a.square().sum() * b.square().sum() + eps)
    return total


def random_factors(m=3, p=3, r=4, d_in=11, d_out=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_()  # noqa: E731
    return make(p, d_in, r), make(p, r, d_out), make(m, p, r, r)


SIMILARITIES = ["cross_gram", "output_cov", "cosine"]


@pytest.mark.parametrize("similarity", SIMILARITIES)
@pytest.mark.parametrize("eps", [1e-8, 0.5])
def test_value_and_gradient_match_naive_formula(similarity, eps):
    down, up, q = random_factors()
    fast = sade(down, up, q, similarity, eps)
    slow = naive_sade(down, up, q, similarity, eps)
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-12)
    grads_fast = torch.autograd.grad(fast, (down, up, q))
    grads_slow = torch.autograd.grad(slow, (down, up, q))
    for gf, gs in zip(grads_fast, grads_slow, strict=True):
        assert gs.abs().max() > 0
        torch.testing.assert_close(gf, gs, rtol=1e-9, atol=1e-12)


def test_more_spaces_than_dimensions_and_rank_one():
    for p, r, d_in, d_out in [(5, 3, 4, 6), (2, 1, 3, 3)]:
        down, up, q = random_factors(m=2, p=p, r=r, d_in=d_in, d_out=d_out, seed=p)
        for similarity in SIMILARITIES:
            torch.testing.assert_close(
                sade(down, up, q, similarity), naive_sade(down, up, q, similarity, 1e-8)
            )


@pytest.mark.parametrize("similarity", SIMILARITIES)
def test_scale_free_and_bounded(similarity):
    down, up, q = random_factors()
    base = sade(down, up, q, similarity, eps=1e-12)
    scaled = sade(down, up, q * torch.tensor([3.0, 0.1, 7.0], dtype=q.dtype)[:, None, None, None],
                  similarity, eps=1e-12)
    torch.testing.assert_close(base, scaled)
    # ||A_h A_k^T||, ||A_h^T A_k||, |<A_h, A_k>| <= ||A_h|| ||A_k||: each of the
    # m p (p - 1) terms is at most one
    assert 0 < base <= q.shape[0] * 3 * 2


def test_output_cov_differs_from_cross_gram():
    """Parts that read orthogonal input subspaces and write the same output space: their
    outputs are uncorrelated (A_h^T A_k = 0 as D_h^T D_k = 0) while A_h A_k^T is not."""
    down, up, q = random_factors(m=1, p=2, r=2, d_in=4, d_out=3)
    with torch.no_grad():
        down.copy_(torch.eye(4, dtype=down.dtype).reshape(4, 2, 2).permute(1, 0, 2))
        up[1] = up[0]
    assert sade(down, up, q, "output_cov", eps=0.0) == 0
    assert sade(down, up, q, "cross_gram", eps=0.0) > 0


def test_zero_modules_give_zero_value_and_finite_gradient():
    down, up, q = random_factors()
    q = torch.zeros_like(q, requires_grad=True)
    for similarity in SIMILARITIES:
        value = sade(down, up, q, similarity)
        assert value.item() == 0
        assert all(torch.isfinite(g).all() for g in torch.autograd.grad(value, (down, up, q)))


def test_identical_parts_are_maximally_similar():
    """Two equal A_h: the cosine term is exactly one, the cross-Gram term positive."""
    down, up, q = random_factors(m=1, p=2)
    with torch.no_grad():
        down[1], up[1], q[0, 1] = down[0], up[0], q[0, 0]
    torch.testing.assert_close(sade(down, up, q, "cosine", eps=0.0),
                               torch.tensor(2.0, dtype=q.dtype))
    assert sade(down, up, q, "cross_gram", eps=0.0) > 0


class _LargestOutput(TorchFunctionMode):
    """Records the largest tensor any torch call returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("similarity", SIMILARITIES)
def test_never_forms_d_by_d_matrices(similarity):
    d, p, r, m = 384, 4, 8, 3
    down, up = torch.randn(p, d, r), torch.randn(p, r, d)
    q = torch.randn(m, p, r, r, requires_grad=True)
    with _LargestOutput() as probe:
        sade(down, up, q, similarity)
    assert probe.largest < d * d // 8  # the inputs themselves hold p d r = d^2 / 12 entries


@pytest.mark.parametrize("similarity", SIMILARITIES)
def test_regularization_loss_sums_weighted_sade_over_modules(similarity):
    torch.manual_seed(0)
    tiny = dict(cls_dim=5, depth=2, num_group=16, group_size=8, trans_dim=48, encoder_dims=48)
    model = PointMAE(**tiny)
    apply_adapter(model, "clora", sade_weight=0.25, sade_similarity=similarity,
                  target_modules=["attn.qkv", "attn.proj", "mlp.fc1"])
    modules = [m for m in model.modules() if isinstance(m, CLoRALinear)]
    with torch.no_grad():
        for m in modules:
            m.clora_Q.normal_()
        for space in model.clora_bank.parameters():  # trained spaces are no longer orthogonal
            space.add_(0.2 * torch.randn_like(space))
    expected = 0.0
    for m in modules:
        down = model.clora_bank.down[str(m.in_features)].double()
        up = model.clora_bank.up[str(m.slice_out)].double()
        expected += naive_sade(down, up, m.clora_Q.double(), similarity, 1e-8)
    assert len(modules) == 6 and sorted(model.clora_bank.up.keys()) == ["192", "48"]
    torch.testing.assert_close(regularization_loss(model).double(), 0.25 * expected, rtol=1e-4,
                               atol=0)
    apply_off = PointMAE(**tiny)
    apply_adapter(apply_off, "clora", sade_weight=0.0)
    assert regularization_loss(apply_off).item() == 0
