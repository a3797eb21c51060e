"""The closed-form pieces against autograd and unfold."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from cbn_mmdet.cbn.conv_trace import find_producing_conv
from cbn_mmdet.cbn.functional import CountNormalize, mean_patch, project, weight_derivatives
from cbn_mmdet.cbn.kernels import PORTABLE

CONVS = [
    dict(kernel_size=3, padding=1),
    dict(kernel_size=3, stride=2, padding=1),
    dict(kernel_size=3, padding=2, dilation=2),
    dict(kernel_size=3, padding=1, groups=2),
    dict(kernel_size=1),
    dict(kernel_size=(3, 1), stride=(2, 1), padding=(1, 0), bias=True),
    dict(kernel_size=5, stride=3, padding=0),
]


@pytest.mark.parametrize('hw', [(11, 10), (40, 37)])  # one tap matrix / separable (> 1024 positions)
@pytest.mark.parametrize('kw', CONVS)
def test_mean_patch_matches_unfold(kw, hw):
    from cbn_mmdet.cbn import functional
    assert (hw[0] * hw[1] > functional._KRON_MAX) == (hw == (40, 37))
    x = torch.randn(3, 4, *hw, dtype=torch.float64)
    k = kw['kernel_size'] if isinstance(kw['kernel_size'], tuple) else (kw['kernel_size'],) * 2
    pair = lambda v: v if isinstance(v, tuple) else (v, v)  # noqa: E731
    s, p, d = pair(kw.get('stride', 1)), pair(kw.get('padding', 0)), pair(kw.get('dilation', 1))
    cols = F.unfold(x, k, dilation=d, padding=p, stride=s)  # (N, C*kh*kw, L)
    ho = (hw[0] + 2 * p[0] - d[0] * (k[0] - 1) - 1) // s[0] + 1
    wo = (hw[1] + 2 * p[1] - d[1] * (k[1] - 1) - 1) // s[1] + 1
    expected = cols.sum((0, 2)).reshape(4, *k)
    torch.testing.assert_close(mean_patch(x, k, s, p, d, (ho, wo)), expected)


@pytest.mark.parametrize('kw', CONVS)
def test_weight_derivatives_match_autograd(kw):
    conv = torch.nn.Conv2d(4, 6, **kw).double()
    x = torch.randn(2, 4, 11, 10, dtype=torch.float64)
    y = conv(x)
    mu, nu = y.mean((0, 2, 3)), (y * y).mean((0, 2, 3))
    dmu_ref = torch.autograd.grad(mu.sum(), conv.weight, retain_graph=True)[0]
    dnu_ref = torch.autograd.grad(nu.sum(), conv.weight, retain_graph=True)[0]
    rec, why = find_producing_conv(y)
    assert why == 'conv' and rec.weight is conv.weight
    dmu, dnu = weight_derivatives(rec, y.detach())
    g = conv.groups
    torch.testing.assert_close(dnu, dnu_ref.reshape(6, -1))
    # d mu/dW is the same mean patch for every channel of a group
    torch.testing.assert_close(dmu.repeat_interleave(6 // g, 0), dmu_ref.reshape(6, -1))
    wmu, wnu = project(dmu, dnu, conv.weight.detach().reshape(6, -1))
    torch.testing.assert_close(wnu, (dnu_ref * conv.weight).sum((1, 2, 3)))
    torch.testing.assert_close(wmu, (dmu_ref * conv.weight).sum((1, 2, 3)))


@pytest.mark.parametrize('affine', [True, False])
def test_count_normalize_backward_is_bn_backward_over_count(affine):
    """With mean/var built from y and constants, autograd of the explicit formula must equal
    CountNormalize's closed-form backward."""
    y = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, dtype=torch.float64, requires_grad=True) if affine else None
    b = torch.randn(3, dtype=torch.float64, requires_grad=True) if affine else None
    c_mu, c_nu, n, eps = torch.randn(3).double(), torch.rand(3).double() + 2, 3, 1e-5
    m = 2 * 4 * 5

    def explicit(y):
        mean = (y.mean((0, 2, 3)) + c_mu) / n
        var = ((y * y).mean((0, 2, 3)) + c_nu) / n - mean * mean
        out = (y - mean.view(1, -1, 1, 1)) / (var.view(1, -1, 1, 1) + eps).sqrt()
        return out * w.view(1, -1, 1, 1) + b.view(1, -1, 1, 1) if affine else out
    g = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    ref = explicit(y)
    ref_grads = torch.autograd.grad(ref, [y] + ([w, b] if affine else []), g)
    with torch.no_grad():
        mean = (y.mean((0, 2, 3)) + c_mu) / n
        var = ((y * y).mean((0, 2, 3)) + c_nu) / n - mean * mean
    counts = PORTABLE.counts(torch.tensor([1.0 / n, 1.0, 0.0, float(n * m)], dtype=torch.float64),
                             None, 0)
    out = CountNormalize.apply(y, w, b, mean, (var + eps).rsqrt(), var, eps, counts, PORTABLE)
    grads = torch.autograd.grad(out, [y] + ([w, b] if affine else []), g)
    torch.testing.assert_close(out, ref)
    for a, e in zip(grads, ref_grads):
        torch.testing.assert_close(a, e)


class _CpuSpy(TorchDispatchMode):
    """Records every ATen op that reads or makes a CPU tensor (the model lives on 'meta')."""

    def __init__(self):
        super().__init__()
        self.cpu_ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        tensors = [a for a in list(args) + list(kwargs.values()) + list(
            out if isinstance(out, (list, tuple)) else [out]) if isinstance(a, torch.Tensor)]
        if any(t.device.type == 'cpu' for t in tensors):
            self.cpu_ops.append(str(func))
        return out


def test_training_steps_build_nothing_on_the_host_for_the_device():
    """Windowed, compensated training steps with the element count changing every step (a mask
    head's positive RoIs, padded batch shapes) on the 'meta' device: no op reads or makes a CPU
    tensor, so on an accelerator no table is built on the host and copied (a host wait) and
    nothing is read back (a meta tensor has no values: any host sync would raise)."""
    from cbn_mmdet.cbn import CrossIterationBatchNorm2d
    conv = nn.Conv2d(3, 8, 3, padding=1).to('meta')
    cbn = CrossIterationBatchNorm2d(8, window=3, burnin=1).to('meta')
    spy = _CpuSpy()
    for step, (n, h, w) in enumerate([(2, 6, 6), (5, 6, 6), (3, 10, 6), (7, 14, 14), (4, 40, 36)]):
        x = torch.randn(n, 3, h, w, device='meta')
        with spy:
            out = cbn(conv(x))
            out.sum().backward()
        assert out.device.type == 'meta'
    assert cbn._step == 5 and cbn.cbn_deriv.dim() == 4  # windowed and compensated
    assert spy.cpu_ops == []


def test_shape_tables_keep_the_recently_used_ones():
    """The tables are an LRU by shape: an entry in use survives any number of new shapes."""
    from cbn_mmdet.cbn import functional as fn
    fn.window_factors(17, 3, torch.float32, torch.device('cpu'))
    first = fn._FACTORS.get((17, 3, torch.float32, torch.device('cpu')))
    for m in range(1000, 1000 + 2 * fn._TAPS_MAX):
        fn.window_factors(m, 3, torch.float32, torch.device('cpu'))
        fn.window_factors(17, 3, torch.float32, torch.device('cpu'))  # in use every step
        assert len(fn._FACTORS) <= fn._TAPS_MAX
    assert fn._FACTORS.get((17, 3, torch.float32, torch.device('cpu'))) is first
    assert (1000, 3, torch.float32, torch.device('cpu')) not in fn._FACTORS
