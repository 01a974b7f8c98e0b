"""The fused spline evaluation against the reference composition it replaces.

`DomainSpline.forward_and_log_det` / `inverse_and_log_det` run a custom autograd Function with
an analytic backward; `reference_forward_and_log_det` / `reference_inverse_and_log_det`
compose `rqs_knots` and `rqs_forward` / `rqs_inverse` from plain autograd operations. Values
and gradients agree to float rounding (float32 and float64, per-sample and shared parameters,
inputs beyond the bounds), gradients are checked by finite differences (gradcheck), and second
derivatives, needed where gradients of log q enter a loss (SNF layers), by gradgradcheck.
"""

from __future__ import annotations

import math

import pytest
import torch

from boltzgen.flows import Bounded, Circular, DomainSpline, Unbounded
from boltzgen.flows.base import wrap_circular

DOMAINS = [Unbounded(), Bounded(-1.0, 2.0), Circular(), Unbounded(), Circular()]


def _inputs(dtype, n=400, seed=0, beyond=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, len(DOMAINS), generator=g, dtype=dtype) * 3.0  # some beyond [-5, 5]
    lo, width = (-1.2, 3.4) if beyond else (-0.99, 2.98)
    x[:, 1] = torch.rand(n, generator=g, dtype=dtype) * width + lo
    x = wrap_circular(x, torch.tensor([isinstance(d, Circular) for d in DOMAINS]))
    params = torch.randn(n, len(DOMAINS), 25, generator=g, dtype=dtype) * 1.5
    return x, params


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("beyond", [False, True])
def test_fused_spline_matches_reference(dtype, inverse, shared, beyond):
    spline = DomainSpline(DOMAINS, n_bins=8)
    x, params = _inputs(dtype, beyond=beyond)
    if shared:  # one parameter set for the whole batch (identity splines of couplings)
        params = params[:1]
    x.requires_grad_(True)
    params.requires_grad_(True)
    if inverse:
        fn, ref = spline.inverse_and_log_det, spline.reference_inverse_and_log_det
    else:
        fn, ref = spline.forward_and_log_det, spline.reference_forward_and_log_det
    y, ld = fn(x, params)
    y_ref, ld_ref = ref(x, params)
    # float32: steep random splines (derivatives up to ~1e3) amplify one-ulp differences
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y, y_ref, **tol)
    torch.testing.assert_close(ld, ld_ref, **tol)
    if beyond:
        # Inputs clamped onto a bound sit on a kink of the clamp: whether the clamp of t
        # passes a gradient depends on the last bit of t, so only finiteness is compared.
        g = torch.autograd.grad(y.sum() + ld.sum(), (x, params))
        assert all(bool(torch.isfinite(v).all()) for v in g)
        return
    wy = torch.linspace(0.5, 1.5, y.numel(), dtype=dtype).view_as(y)
    wl = torch.linspace(-1.0, 2.0, y.numel(), dtype=dtype).view_as(y)
    grads = torch.autograd.grad((wy * y).sum() + (wl * ld).sum(), (x, params))
    grads_ref = torch.autograd.grad((wy * y_ref).sum() + (wl * ld_ref).sum(), (x, params))
    gtol = dict(rtol=1e-3, atol=1e-3) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-9)
    for g, g_ref in zip(grads, grads_ref):
        scale = g_ref.abs().amax().clamp_min(1.0)  # relative to the largest entry
        torch.testing.assert_close(g / scale, g_ref / scale, **gtol)


@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("shared", [False, True])
def test_fused_spline_gradcheck_and_gradgradcheck(inverse, shared):
    spline = DomainSpline(DOMAINS, n_bins=4)
    g = torch.Generator().manual_seed(1)
    x = torch.tensor(
        [[0.3, 0.5, 1.0, -6.0, -2.5], [-1.7, -0.4, -3.0, 2.0, 0.1], [4.0, 1.9, 3.0, -0.2, -0.7]]
    )
    x = x.double().requires_grad_(True)
    params = torch.randn(1 if shared else 3, len(DOMAINS), 13, generator=g) * 0.7
    params = params.double().requires_grad_(True)
    fn = spline.inverse_and_log_det if inverse else spline.forward_and_log_det
    assert torch.autograd.gradcheck(fn, (x, params))
    assert torch.autograd.gradgradcheck(fn, (x, params))


def test_fused_spline_gradient_of_one_output_and_no_grad():
    spline = DomainSpline(DOMAINS, n_bins=8).double()
    x, params = _inputs(torch.float64, n=50)
    x.requires_grad_(True)
    y, ld = spline.forward_and_log_det(x, params)  # params without gradient
    (gx,) = torch.autograd.grad(ld.sum(), x)
    y_ref, ld_ref = spline.reference_forward_and_log_det(x, params)
    torch.testing.assert_close(gx, torch.autograd.grad(ld_ref.sum(), x)[0])
    with torch.no_grad():
        y2, ld2 = spline.forward_and_log_det(x, params)
    assert not y2.requires_grad
    torch.testing.assert_close(y2, y.detach())


def test_fused_spline_circle_ends():
    spline = DomainSpline([Circular()] * 3, n_bins=6).double()
    params = torch.randn(1, 3, 19, dtype=torch.float64)
    y, _ = spline.forward_and_log_det(torch.full((1, 3), -math.pi, dtype=torch.float64), params)
    assert torch.allclose(y, torch.full_like(y, -math.pi))


def test_spline_coupling_state_dict_keys_unchanged():
    """Checkpoints of earlier versions load: the coupling's state-dict keys and shapes are the
    same (the index buffers added for speed are not persistent)."""
    from boltzgen.flows import SplineCoupling

    domains = [Unbounded(), Circular(), Unbounded(), Circular(), Bounded(0.0, 1.0)]
    layer = SplineCoupling(domains, torch.tensor([1, 0, 1, 0, 0]).bool(), 4, hidden=8,
                           identity_spline=True)  # fmt: skip
    shapes = {k: tuple(v.shape) for k, v in layer.state_dict().items()}
    assert shapes == {
        "t_idx": (2,), "id_idx": (3,), "inv_perm": (5,),
        "spline_t.unbounded": (2,), "spline_t.circular": (2,),
        "spline_id.unbounded": (3,), "spline_id.circular": (3,),
        "id_params": (3, 13),
        "net.initial.weight": (8, 5), "net.initial.bias": (8,),
        "net.blocks.0.1.weight": (8, 8), "net.blocks.0.1.bias": (8,),
        "net.blocks.0.4.weight": (8, 8), "net.blocks.0.4.bias": (8,),
        "net.final.weight": (26, 8), "net.final.bias": (26,),
    }  # fmt: skip
