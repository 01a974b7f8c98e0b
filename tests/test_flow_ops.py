"""The fused spline evaluation against the reference composition it replaces.

`DomainSpline.forward_and_log_det` / `inverse_and_log_det` run a custom autograd Function with
an analytic backward; `reference_forward_and_log_det` / `reference_inverse_and_log_det`
compose `rqs_knots` and `rqs_forward` / `rqs_inverse` from plain autograd operations. Values
and gradients agree to float rounding (float32 and float64, per-sample and shared parameters,
inputs beyond the bounds), gradients are checked by finite differences (gradcheck), and second
derivatives, needed where gradients of log q enter a loss (SNF layers), by gradgradcheck.
Each test runs twice: through the compiled CPU kernels of `boltzgen.native` and through
the torch evaluation (`_FusedSpline`) that is used where the kernels are not built.
"""

from __future__ import annotations

import contextlib
import math
import platform
import shutil

import pytest
import torch

from boltzgen import native
from boltzgen.flows import Bounded, Circular, DomainSpline, Unbounded
from boltzgen.flows import splines as splines_mod
from boltzgen.flows.base import wrap_circular
from boltzgen.flows.splines import is_lane_major

DOMAINS = [Unbounded(), Bounded(-1.0, 2.0), Circular(), Unbounded(), Circular()]


@pytest.fixture(params=["native", "torch"])
def impl(request, monkeypatch):
    """Which evaluation `DomainSpline` uses: the compiled kernels or the torch one."""
    if request.param == "native":
        if not native.enabled("spline"):  # test_native_kernels_build says whether they should
            pytest.skip(f"compiled kernels not built here: {native.status()}")
        calls = []
        real = splines_mod._NativeSpline.apply
        monkeypatch.setattr(splines_mod._NativeSpline, "apply",
                            lambda *a: calls.append(1) or real(*a))  # fmt: skip
        yield request.param
        assert calls, "the compiled kernels were not used"
    else:
        with native.disabled():
            yield request.param


def test_native_kernels_build():
    """Linux x86-64 with a C compiler (the CI machine, the conda environment) builds them."""
    if platform.system() == "Linux" and platform.machine() == "x86_64" and shutil.which("cc"):
        assert all(native.enabled(f) for f in ("spline", "energy", "zmatrix")), native.status()
    assert native.status()


def _inputs(dtype, n=400, seed=0, beyond=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, len(DOMAINS), generator=g, dtype=dtype) * 3.0  # some beyond [-5, 5]
    lo, width = (-1.2, 3.4) if beyond else (-0.99, 2.98)
    x[:, 1] = torch.rand(n, generator=g, dtype=dtype) * width + lo
    x = wrap_circular(x, torch.tensor([isinstance(d, Circular) for d in DOMAINS]))
    params = torch.randn(n, len(DOMAINS), 25, generator=g, dtype=dtype) * 1.5
    return x, params


def _laid_out(params: torch.Tensor, layout: str) -> torch.Tensor:
    """``params`` (B, D, 3K + 1) as one parameter set ("shared", the identity splines of
    couplings), row-major ("rows") or lane-major ("lanes": (D, 3K + 1, B) in memory, as a
    coupling's conditioner writes them for the kernels); a leaf tensor."""
    if layout == "shared":
        return params[:1].clone()
    if layout == "rows":
        return params.contiguous()
    b, d, n = params.shape
    out = torch.empty_strided(params.shape, (1, n * b, b), dtype=params.dtype)
    assert is_lane_major(out.copy_(params))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("layout", ["rows", "lanes", "shared"])
@pytest.mark.parametrize("beyond", [False, True])
def test_fused_spline_matches_reference(impl, dtype, inverse, layout, beyond):
    spline = DomainSpline(DOMAINS, n_bins=8)
    x, params = _inputs(dtype, n=407, beyond=beyond)  # 407: a last tile of 7 lanes
    params = _laid_out(params, layout)
    x.requires_grad_(True)
    params.requires_grad_(True)
    if inverse:
        fn, ref = spline.inverse_and_log_det, spline.reference_inverse_and_log_det
    else:
        fn, ref = spline.forward_and_log_det, spline.reference_forward_and_log_det
    y, ld = fn(x, params)
    y_ref, ld_ref = ref(x, params)
    if dtype == torch.float32 and impl == "native":
        # Other rounding (the kernels' exp/log are libmvec's, not torch's): steep random
        # splines (derivatives up to ~1e3) turn one-ulp knot differences into ~1e-3 log-det
        # differences, so both float32 evaluations are held against the float64 one: the
        # kernels' errors must be those of torch's own float32 evaluation.
        with torch.no_grad():
            y64, ld64 = ref(x.detach().double(), params.detach().double())
        for got, mine, truth in ((y, y_ref, y64), (ld, ld_ref, ld64)):
            err = (got.detach().double() - truth).abs()
            err_ref = (mine.detach().double() - truth).abs()
            assert float(err.mean()) <= 1.5 * float(err_ref.mean()) + 1e-7
            assert float(err.max()) <= 10.0 * float(err_ref.max()) + 1e-5
    else:
        # float32: steep random splines amplify one-ulp differences; float64 through the
        # kernels: libmvec's exp/log are within a few ulp of torch's
        f64 = 1e-10 if impl == "native" else 1e-12
        tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=f64, atol=f64)
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
    if dtype == torch.float32 and impl == "native":  # against float64, as the values above
        x64 = x.detach().double().requires_grad_(True)
        p64 = params.detach().double().requires_grad_(True)
        y64, ld64 = ref(x64, p64)
        grads64 = torch.autograd.grad((wy.double() * y64).sum() + (wl.double() * ld64).sum(),
                                      (x64, p64))  # fmt: skip
        for g, g_ref, g64 in zip(grads, grads_ref, grads64):
            scale = g64.abs().amax().clamp_min(1.0)
            err = ((g.double() - g64) / scale).abs()
            err_ref = ((g_ref.double() - g64) / scale).abs()
            assert float(err.mean()) <= 1.5 * float(err_ref.mean()) + 1e-7
            assert float(err.max()) <= 10.0 * float(err_ref.max()) + 1e-5
        return
    gtol = dict(rtol=1e-3, atol=1e-3) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-9)
    for g, g_ref in zip(grads, grads_ref):
        scale = g_ref.abs().amax().clamp_min(1.0)  # relative to the largest entry
        torch.testing.assert_close(g / scale, g_ref / scale, **gtol)


@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("layout", ["rows", "lanes", "shared"])
def test_fused_spline_gradcheck_and_gradgradcheck(impl, inverse, layout):
    spline = DomainSpline(DOMAINS, n_bins=4)
    g = torch.Generator().manual_seed(1)
    x = torch.tensor(
        [[0.3, 0.5, 1.0, -6.0, -2.5], [-1.7, -0.4, -3.0, 2.0, 0.1], [4.0, 1.9, 3.0, -0.2, -0.7]]
    )
    x = x.double().requires_grad_(True)
    params = torch.randn(3, len(DOMAINS), 13, generator=g, dtype=torch.float64) * 0.7
    params = _laid_out(params, layout).requires_grad_(True)
    fn = spline.inverse_and_log_det if inverse else spline.forward_and_log_det
    assert torch.autograd.gradcheck(fn, (x, params))
    assert torch.autograd.gradgradcheck(fn, (x, params))


def test_spline_second_derivatives_and_jacobian_of_strided_inputs(impl):
    """Inputs that are views (a column slice, as a coupling layer's split gives) keep their
    graph through a double backward, and a vectorised jacobian (vmapped gradients) works."""
    spline = DomainSpline(DOMAINS, n_bins=4)
    g = torch.Generator().manual_seed(2)
    wide = torch.randn(6, 2 * len(DOMAINS), generator=g, dtype=torch.float64)
    wide[:, 1::2] = torch.rand(6, len(DOMAINS), generator=g, dtype=torch.float64) * 2.9 - 0.95
    wide.requires_grad_(True)
    params = torch.randn(6, len(DOMAINS), 13, generator=g, dtype=torch.float64) * 0.7
    x = wide[:, 1::2]  # a strided view
    assert not x.is_contiguous()

    def second(v):
        y, ld = spline.forward_and_log_det(v, params)
        (g1,) = torch.autograd.grad((y * y).sum() + ld.sum(), v, create_graph=True)
        return torch.autograd.grad((g1 * g1).sum(), wide)[0]

    got = second(x)
    with native.disabled():
        want = second(wide[:, 1::2])
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    jac = torch.autograd.functional.jacobian(
        lambda v: spline.forward_and_log_det(v, params)[1].sum(0), x.detach(), vectorize=True
    )
    with native.disabled():
        ref = torch.autograd.functional.jacobian(
            lambda v: spline.forward_and_log_det(v, params)[1].sum(0), x.detach()
        )
    torch.testing.assert_close(jac, ref, rtol=1e-10, atol=1e-10)


def test_fused_spline_gradient_of_one_output_and_no_grad(impl):
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


def test_fused_spline_circle_ends(impl):
    spline = DomainSpline([Circular()] * 3, n_bins=6).double()
    params = torch.randn(1, 3, 19, dtype=torch.float64)
    y, _ = spline.forward_and_log_det(torch.full((1, 3), -math.pi, dtype=torch.float64), params)
    assert torch.allclose(y, torch.full_like(y, -math.pi))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_spline_coupling_kernels_read_the_conditioner_lane_major(dtype):
    """Where the kernels run, a coupling's conditioner writes the spline parameters lane-major
    (its last layer as W h^T); values, log-dets and every parameter gradient equal those of
    the torch evaluation with row-major parameters, forward and inverse."""
    from boltzgen.flows import SplineCoupling
    from boltzgen.flows.nets import ResidualNet

    if not native.enabled("spline"):
        pytest.skip(f"compiled kernels not built here: {native.status()}")
    domains = [Unbounded(), Circular(), Bounded(0.0, 1.0), Circular(), Unbounded(), Circular()]
    torch.manual_seed(3)
    layer = SplineCoupling(domains, torch.tensor([1, 0, 1, 1, 0, 0]).bool(), 6, hidden=16,
                           identity_spline=True, identity_init=False).to(dtype)  # fmt: skip
    for p in layer.parameters():
        p.data.normal_(0.0, 0.3)
    z = torch.randn(37, 6, dtype=dtype)  # 37: a last tile of 5 lanes
    z[:, 2] = torch.rand(37, dtype=dtype)
    seen = []
    real_forward = ResidualNet.forward

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("transposed", False))
        return real_forward(self, *args, **kwargs)

    results = []
    for kernels in (True, False):
        with native.disabled() if not kernels else contextlib.nullcontext():
            layer.zero_grad()
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(ResidualNet, "forward", spy)
                x, ld = layer.forward_and_log_det(z)
                zz, ld_inv = layer.inverse_and_log_det(x.detach())
            (x.sum() + ld.sum() + ld_inv.sum() + zz.sum()).backward()
            grads = [p.grad.clone() for p in layer.parameters()]
            results.append((x.detach(), ld.detach(), zz.detach(), ld_inv.detach(), grads))
    assert seen == [True, True, False, False]  # lane-major with the kernels only
    tol = dict(rtol=2e-4, atol=2e-4) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-9)
    (a, b) = results
    for got, want in zip(a[:4], b[:4]):
        torch.testing.assert_close(got, want, **tol)
    torch.testing.assert_close(a[2], z, **tol)  # the inverse undoes the forward
    for got, want in zip(a[4], b[4]):
        scale = want.abs().amax().clamp_min(1.0)
        torch.testing.assert_close(got / scale, want / scale, **tol)


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


def _native_status_in_child(tmp_path, **env) -> str:
    import os
    import subprocess
    import sys

    code = (
        "import torch; from boltzgen import native; "
        "from boltzgen.flows import DomainSpline, Unbounded; "
        "sp = DomainSpline([Unbounded()] * 3); x = torch.randn(5, 3); "
        "y, ld = sp.forward_and_log_det(x, torch.zeros(5, 3, sp.n_params)); "
        "assert torch.allclose(y, x, atol=1e-5) and ld.abs().max() < 1e-5; print(native.status())"
    )
    full_env = {**os.environ, "BOLTZGEN_CACHE_DIR": str(tmp_path), **env}
    proc = subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_native_kernels_fall_back_and_cache(tmp_path):
    """No compiler, or BOLTZGEN_NATIVE=0: the torch evaluation, with the reason in the status
    line; with one, the library is built once into the cache and loaded from there after."""
    broken = _native_status_in_child(tmp_path / "a", CC="false")
    assert broken.startswith("torch evaluation") and "failed" in broken
    off = _native_status_in_child(tmp_path / "b", BOLTZGEN_NATIVE="0")
    assert off == "torch evaluation (switched off by BOLTZGEN_NATIVE)"
    if not native.available():
        return
    first = _native_status_in_child(tmp_path / "c")
    (built,) = (tmp_path / "c" / "kernels").glob("kernels-*.so")
    stamp = built.stat().st_mtime_ns
    second = _native_status_in_child(tmp_path / "c")
    assert first == second == f"compiled kernels ({built})"
    assert built.stat().st_mtime_ns == stamp  # loaded, not rebuilt


def test_native_kernels_first_loaded_without_grad(tmp_path):
    """The self-check of a freshly built library runs autograd: first use under no_grad or
    inference_mode (sampling) must still build and use the kernels."""
    if not native.available():
        return
    import os
    import subprocess
    import sys

    code = (
        "import torch; from boltzgen import native\n"
        "from boltzgen.flows import DomainSpline, Unbounded\n"
        "with torch.inference_mode():\n"
        "    sp = DomainSpline([Unbounded()] * 3); x = torch.randn(5, 3)\n"
        "    sp.forward_and_log_det(x, torch.zeros(5, 3, sp.n_params))\n"
        "print(native.status())"
    )
    env = {**os.environ, "BOLTZGEN_CACHE_DIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("compiled kernels"), proc.stdout
