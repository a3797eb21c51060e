"""The CUDA branch's defects, each tested on CPU: the fused kernels run as emulations
(cuda_emulation.py), autocast as CPU autocast, TF32 as operand rounding of float32 matmuls."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from cbn_mmdet.cbn import CrossIterationBatchNorm2d, kernels
from cbn_mmdet.cbn import functional as cbn_functional
from cbn_mmdet.cbn.conv_trace import find_producing_conv
from cbn_mmdet.cbn.functional import compensation_terms, weight_derivatives
from tests.cbn import cuda_emulation as emu
from tests.helpers import FP16_AUTOCAST_CPU, FP16_CONV_CPU

F64 = torch.float64


# ---------------------------------------------------------------- the emulations themselves
def _x(shape=(3, 5, 6, 7), dtype=torch.float32, cl=False):
    x = (torch.randn(shape, dtype=F64) * 2 + 0.5).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if cl else x


@pytest.mark.parametrize('cl', [False, True])
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_emulated_kernels_match_batch_norm(dtype, cl):
    """Forward and backward of F.batch_norm (training) rebuilt from the emulated kernels."""
    x = _x(dtype=dtype, cl=cl)
    acc = torch.float64 if dtype == F64 else torch.float32
    w = torch.rand(5, dtype=acc) + 0.5
    b = torch.randn(5, dtype=acc)
    g = _x(dtype=dtype, cl=cl)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype in (torch.float32, F64) else dict(rtol=2e-2, atol=2e-2)
    xr = x.to(acc).requires_grad_()
    wr, br = w.clone().requires_grad_(), b.clone().requires_grad_()
    ref = F.batch_norm(xr, None, None, wr, br, True, 0.0, 1e-5)
    ref_grads = torch.autograd.grad(ref, (xr, wr, br), g.to(acc))
    with emu.emulated_cuda_kernels(select_fused=False):
        mean, var = torch.batch_norm_update_stats(x, None, None, 0.0)
        mean2, invstd = torch.batch_norm_stats(x, 1e-5)
        out = torch.batch_norm_elemt(x, w, b, mean, invstd, 1e-5)
        sum_dy, sum_dy_xmu, gw, gb = torch.batch_norm_backward_reduce(g, x, mean, invstd, w, True, True, True)
        count = torch.tensor([x.numel() // 5 - 4, 4], dtype=torch.int32)  # the divisor is the sum
        gx = torch.batch_norm_backward_elemt(g, x, mean, invstd, w, sum_dy, sum_dy_xmu, count)
    assert mean.dtype == var.dtype == invstd.dtype == acc
    assert out.dtype == gx.dtype == dtype
    if cl:
        assert out.is_contiguous(memory_format=torch.channels_last)
        assert gx.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(mean, mean2)
    torch.testing.assert_close(var, x.to(acc).var((0, 2, 3), unbiased=False))
    torch.testing.assert_close(invstd, (var + 1e-5).rsqrt())
    torch.testing.assert_close(out.to(acc), ref.detach().to(acc), **tol)
    for a, e in zip((gx, gw, gb), ref_grads):
        torch.testing.assert_close(a.to(acc), e, **tol)


def test_emulated_kernels_raise_as_the_cuda_kernels_do():
    x = _x(dtype=torch.float16)
    mean, invstd = torch.zeros(5), torch.ones(5)
    with emu.emulated_cuda_kernels(select_fused=False):
        assert torch.batch_norm_stats(torch.full((2, 5, 3, 3), 0.25), 0.0)[1].eq(0).all()
        with pytest.raises(RuntimeError, match='0 elements|reshape'):
            torch.batch_norm_update_stats(x[:0], None, None, 0.0)
        with pytest.raises(RuntimeError, match='0 elements|reshape'):
            torch.batch_norm_elemt(x[:0], None, None, mean, invstd, 0.0)
        # fp16 activations, float32 statistics: the weight must be float32
        with pytest.raises(RuntimeError, match='expected scalar type Float but found Half'):
            torch.batch_norm_backward_elemt(x, x, mean, invstd, torch.ones(5).half(), mean, mean,
                                            torch.tensor([90], dtype=torch.int32))
        with pytest.raises(RuntimeError, match='expected scalar type Int but found Long'):
            torch.batch_norm_backward_elemt(x, x, mean, invstd, None, mean, mean, torch.tensor([90]))
        with pytest.raises(RuntimeError, match='same data types'):
            torch.batch_norm_backward_reduce(x, x, mean, invstd.double(), None, True, False, False)
        with pytest.raises(RuntimeError, match='expected scalar type Float but found Double'):
            torch.batch_norm_elemt(x.float(), None, None, mean.double(), invstd.double(), 0.0)
    assert kernels.select(x) is kernels.PORTABLE


# ---------------------------------------------------------------- defects of the CUDA branch
def _conv_layer(c_in=4, c=6, window=3, burnin=0, **kw):
    torch.manual_seed(0)
    return nn.Conv2d(c_in, c, 3, padding=1), CrossIterationBatchNorm2d(c, window=window,
                                                                       burnin=burnin, **kw)


def _train(conv, layer, xs, lr=0.01, autocast=None):
    opt = torch.optim.SGD([*conv.parameters(), *layer.parameters()], lr=lr)
    outs = []
    for x in xs:
        with torch.autocast('cpu', dtype=autocast, enabled=autocast is not None):
            out = layer(conv(x))
        opt.zero_grad()
        out.float().square().mean().backward()
        opt.step()
        outs.append(out.detach().double())
    return outs


def test_dead_channel_keeps_the_window_on_the_cuda_branch():
    """A constant channel (dead filter) has variance 0, not a poisoned window: the fused
    moments once gave nu = inf there, and every batch was skipped."""
    conv, layer = _conv_layer()
    with torch.no_grad():
        conv.weight[2].zero_()
        conv.bias[2] = 0.7
    ref_conv, ref_layer = copy.deepcopy(conv), copy.deepcopy(layer)
    xs = [torch.randn(2, 4, 8, 8) for _ in range(5)]
    with emu.emulated_cuda_kernels():
        outs = _train(conv, layer, xs[:1])
        mu, nu = layer.cbn_moments[0, 0, :, 2]  # the first step, stored: channel 2 is constant
        assert mu.item() == pytest.approx(0.7) and (nu - mu * mu).abs().item() < 1e-6
        outs += _train(conv, layer, xs[1:])
    ref = _train(ref_conv, ref_layer, xs)
    assert layer.cbn_skipped.item() == 0
    assert layer.cbn_valid.sum().item() == 2 and torch.isfinite(layer.cbn_moments).all()
    # channel 2 stays nearly constant: float32 E[y^2] - mu^2 (the portable sums) cancels there
    live = [0, 1, 3, 4, 5]
    torch.testing.assert_close(layer.running_var[live], ref_layer.running_var[live])
    for a, b in zip(outs, ref):
        torch.testing.assert_close(a[:, live], b[:, live], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('dtype', [FP16_CONV_CPU, torch.bfloat16])
@pytest.mark.parametrize('fused', [False, True])
def test_low_precision_model_trains(dtype, fused):
    """A model converted with .half() / .bfloat16(): statistics and window in float32, the
    float32-weight requirement of batch_norm_backward_elemt met, results near float64's."""
    conv, layer = _conv_layer()
    ref_conv, ref_layer = copy.deepcopy(conv).double(), copy.deepcopy(layer).double()
    conv, layer = conv.to(dtype), layer.to(dtype)
    xs = [torch.randn(2, 4, 8, 8, dtype=F64) for _ in range(5)]
    ctx = emu.emulated_cuda_kernels() if fused else torch.autograd.set_grad_enabled(True)
    with ctx:
        outs = _train(conv, layer, [x.to(dtype) for x in xs])
    ref = _train(ref_conv, ref_layer, xs)
    assert layer.cbn_moments.dtype == layer.cbn_dnu.dtype == torch.float32
    assert conv.weight.dtype == layer.weight.dtype == dtype and layer.weight.grad.dtype == dtype
    tol = 0.03 if dtype == torch.float16 else 0.1
    for a, b in zip(outs, ref):
        assert (a - b).abs().max() < tol
    assert (layer.running_var.double() - ref_layer.running_var).abs().max() < tol


def _derivs_ref(conv, x):
    x = x.double()
    w = conv.weight.detach().double().requires_grad_()
    y = F.conv2d(x, w, None, conv.stride, conv.padding)
    dmu = torch.autograd.grad(y.mean((0, 2, 3)).sum(), w, retain_graph=True)[0]
    dnu = torch.autograd.grad((y * y).mean((0, 2, 3)).sum(), w)[0]
    return dmu[0].reshape(1, -1), dnu.reshape(y.shape[1], -1)


@pytest.mark.parametrize('dtype', [FP16_AUTOCAST_CPU, torch.bfloat16])
def test_autocast_derivatives_finite_and_float32_at_fpn_p2_size(dtype):
    """m = 4 * 160 * 160 positions and |E[y x]| ~ 300: the fp16 patch sum (~1e5) and the fp16
    weight-gradient conv (sqrt(m) E[y x] ~ 1e5) overflowed; both must stay finite float32
    and near the float64 values."""
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 2, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.fill_(0.12)
    x = torch.randn(4, 2, 160, 160) * 0.5 + 16
    with torch.autocast('cpu', dtype=dtype):
        y = conv(x)
    rec, _ = find_producing_conv(y)
    with torch.autocast('cpu', dtype=dtype):
        dmu, dnu = weight_derivatives(rec, y.detach())
    ref_mu, ref_nu = _derivs_ref(conv, x)
    assert dmu.dtype == dnu.dtype == torch.float32
    assert torch.isfinite(dmu).all() and torch.isfinite(dnu).all()
    assert ref_nu.abs().max() > 300
    tol = 2e-3 if dtype == torch.float16 else 1e-2
    assert ((dmu.double() - ref_mu).abs().max() / ref_mu.abs().max()) < tol
    assert ((dnu.double() - ref_nu).abs().max() / ref_nu.abs().max()) < tol


@pytest.mark.parametrize('dtype', [FP16_AUTOCAST_CPU, torch.bfloat16])
def test_autocast_compensation_term_keeps_float32_precision(dtype):
    """The compensation is <d, W_t> - <d, W_s> with W_t ~ W_s: computed under autocast it must
    match float64 to float32 accuracy (a half-precision matmul loses all of it)."""
    torch.manual_seed(0)
    c, k, e = 64, 576, 3
    d = torch.cat((torch.randn(c, e, k) * 3 + 1, torch.randn(1, e, k)))  # d nu/dW rows, d mu/dW
    w_s = torch.randn(c, k) * 0.05
    w_t = w_s + torch.randn(c, k) * 0.05 * 1e-3
    with torch.autocast('cpu', dtype=dtype):
        comp = compensation_terms(d, w_t) - compensation_terms(d, w_s)
    exact = compensation_terms(d.double(), w_t.double()) - compensation_terms(d.double(), w_s.double())
    assert comp.dtype == torch.float32
    err = ((comp.double() - exact).abs() / exact.abs().clamp_min(1e-12)).median()
    assert err < 1e-3, err


def _per_backend_precision() -> bool:
    try:  # torch < 2.9: AssertionError ("Unknown attribute") or AttributeError
        torch.backends.cuda.matmul.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision
    except (AttributeError, AssertionError):
        return False
    return True


PER_BACKEND_PRECISION = _per_backend_precision()


class _ReducedMatmul(TorchDispatchMode):
    """Emulates reduced-precision float32 matmuls as the user's settings ask for them at each
    call: float32 operands of mm/bmm/addmm/baddbmm (every overload) rounded to nearest at TF32's
    10 or bf16's 7 mantissa bits. The setting is read like torch's CPU backend reads it:
    mkldnn's per-backend ``fp32_precision`` where torch has it (reading the process-wide one
    would raise after a per-backend one was set), else ``set_float32_matmul_precision``'s."""
    OPS = {torch.ops.aten.mm, torch.ops.aten.bmm, torch.ops.aten.addmm, torch.ops.aten.baddbmm}
    DROPPED_BITS = {'tf32': 13, 'high': 13, 'bf16': 16, 'medium': 16}

    def __init__(self):
        super().__init__()
        self.calls = self.rounded = 0

    @staticmethod
    def setting() -> str:
        if PER_BACKEND_PRECISION:
            value = torch.backends.mkldnn.matmul.fp32_precision
            return torch.backends.fp32_precision if value == 'none' else value
        return torch.get_float32_matmul_precision()

    @staticmethod
    def round(t, dropped: int):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.float32:
            return t
        bits = t.contiguous().view(torch.int32)
        half = 1 << (dropped - 1)
        return ((bits + half) & ~((1 << dropped) - 1)).view(torch.float32).view(t.shape)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in self.OPS and any(
                isinstance(a, torch.Tensor) and a.dtype == torch.float32 for a in args):
            self.calls += 1
            dropped = self.DROPPED_BITS.get(self.setting())
            if dropped:
                self.rounded += 1
                args = tuple(self.round(a, dropped) for a in args)
        return func(*args, **(kwargs or {}))


class _precision:
    """The user's float32 matmul precision for the CPU and CUDA, set with one API and restored:
    ``'legacy'`` is ``set_float32_matmul_precision`` ('high' = TF32, 'medium' = bf16),
    ``'per_backend'`` torch >= 2.9's ``torch.backends.<backend>.matmul.fp32_precision``."""
    LEGACY = {'tf32': 'high', 'bf16': 'medium'}

    def __init__(self, api: str, value: str):
        self.api, self.value = api, value

    def __enter__(self):
        if self.api == 'legacy':
            self.saved = torch.get_float32_matmul_precision()
            torch.set_float32_matmul_precision(self.LEGACY[self.value])
        else:
            self.backends = (torch.backends.cuda.matmul, torch.backends.mkldnn.matmul)
            self.saved = [b.fp32_precision for b in self.backends]
            self.backends[0].fp32_precision = 'tf32'  # CUDA matmuls know no bf16 setting
            self.backends[1].fp32_precision = self.value
        return self

    def now(self):
        if self.api == 'legacy':
            return torch.get_float32_matmul_precision()
        return [b.fp32_precision for b in self.backends]

    def __exit__(self, *exc):
        if self.api == 'legacy':
            torch.set_float32_matmul_precision(self.saved)
        else:
            for b, v in zip(self.backends, self.saved):
                b.fp32_precision = v


APIS = ['legacy', pytest.param('per_backend', marks=pytest.mark.skipif(
    not PER_BACKEND_PRECISION, reason=f'torch {torch.__version__} has no per-backend '
    'fp32_precision API (torch.backends.cuda.matmul.fp32_precision)'))]


def _median_rel_err(a, exact):
    return ((a.double() - exact).abs() / exact.abs().clamp_min(1e-12)).median().item()


@pytest.mark.parametrize('api', APIS)
@pytest.mark.parametrize('value,bound', [('tf32', 2e-3), ('bf16', 2e-2)])
def test_reduced_precision_matmuls_cannot_cancel_the_compensation(api, value, bound):
    """The compensation ``<d, W_t> - <d, W_s>`` (W_t ~ W_s) with float32 matmuls rounding their
    operands as the user asked (emulated): it keeps the relative error of one rounding of ``d``
    against float64, where the same difference of plain single products under the same
    rounding is lost entirely. Every one of its matmuls ran rounded: the layer did not switch
    the setting off around them."""
    torch.manual_seed(0)
    c, k, e = 64, 576, 3
    d = torch.cat((torch.randn(c, e, k) * 3 + 1, torch.randn(1, e, k)))  # d nu/dW rows, d mu/dW
    w_s = torch.randn(c, k) * 0.05
    w_t = w_s + torch.randn(c, k) * 0.05 * 1e-3
    exact = compensation_terms(d.double(), w_t.double()) - compensation_terms(d.double(), w_s.double())
    mode = _ReducedMatmul()
    with _precision(api, value), mode:
        comp = compensation_terms(d, w_t) - compensation_terms(d, w_s)
        plain = (torch.bmm(d[:c], w_t[:, :, None]) - torch.bmm(d[:c], w_s[:, :, None]))[..., 0]
    assert mode.calls == mode.rounded == 6, (mode.calls, mode.rounded)  # 2 + 2 + 2 plain
    assert comp.dtype == torch.float32
    assert _median_rel_err(comp, exact) < bound
    assert _median_rel_err(plain.t(), exact[:, 1]) > 0.2  # what the rounding does to one product


@pytest.mark.parametrize('api', APIS)
def test_tf32_matmuls_train_as_full_precision(api, kernel_set):
    """Training steps with TF32 float32 matmuls (emulated) set with either API: the layer reads
    the setting (the per-backend one where it was set: reading the process-wide one would raise)
    and never changes it (every matmul of the layer ran rounded, the setting is the user's after
    every call), and the outputs and running statistics stay within TF32's rounding of the
    derivatives of the full-precision run, far closer than plain averaging is."""
    conv, layer = _conv_layer(c_in=8, c=16, window=4)
    xs = [torch.randn(2, 8, 12, 12) * 2 + 1 for _ in range(6)]
    ref_conv, ref_layer = copy.deepcopy(conv), copy.deepcopy(layer)
    plain_conv, plain_layer = copy.deepcopy(conv), copy.deepcopy(layer)
    plain_layer.compensate = False
    ref = _train(ref_conv, ref_layer, xs, lr=0.05)
    plain = _train(plain_conv, plain_layer, xs, lr=0.05)
    mode, outs = _ReducedMatmul(), []
    opt = torch.optim.SGD([*conv.parameters(), *layer.parameters()], lr=0.05)
    with _precision(api, 'tf32') as prec:
        user = prec.now()
        if api == 'per_backend':
            with pytest.raises(RuntimeError, match='mix of the legacy and new APIs'):
                torch.get_float32_matmul_precision()  # what the layer must not read
        for x in xs:
            y = conv(x)  # the conv itself is not under test
            with mode:
                out = layer(y)
            assert prec.now() == user
            opt.zero_grad()
            out.square().mean().backward()
            opt.step()
            outs.append(out.detach().double())
    assert mode.calls > 0 and mode.rounded == mode.calls, (mode.calls, mode.rounded)
    # measured: outputs within 4e-5, running_var 4e-4 of plain averaging's gap; with the
    # weight's products unsplit (a single TF32 product each) 4e-4 and 1.7e-3
    for a, b in zip(outs, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
    gap_tf32 = (layer.running_var - ref_layer.running_var).abs().max()
    gap_plain = (plain_layer.running_var - ref_layer.running_var).abs().max()
    assert gap_tf32 < 1e-3 * gap_plain, (gap_tf32, gap_plain)


def test_the_precision_query_follows_the_api_torch_has():
    """compat picks the per-backend reader where torch has that API, else the process-wide one;
    either reads what the user set, for the CPU and CUDA alike, and nothing when unset."""
    from cbn_mmdet.cbn import compat
    chosen = compat.resolve()['reduced_matmul_precision']
    assert chosen == ('_reduced_per_backend' if PER_BACKEND_PRECISION else '_reduced_legacy')
    try:
        apis = ['legacy'] + (['per_backend'] if PER_BACKEND_PRECISION else [])
        for api in apis:
            if api == 'legacy' and PER_BACKEND_PRECISION:
                compat.resolve(missing={'per_backend_precision'})
            assert not compat.reduced_matmul_precision('cpu')
            assert not compat.reduced_matmul_precision('cuda')
            with _precision(api, 'tf32'):
                assert compat.reduced_matmul_precision('cpu')
                assert compat.reduced_matmul_precision('cuda')
            assert not compat.reduced_matmul_precision('cpu')
            compat.resolve()
    finally:
        compat.resolve()


def test_non_finite_derivatives_never_enter_the_window(monkeypatch):
    conv, layer = _conv_layer()
    real = cbn_functional.derivatives
    calls = []

    def poisoned(rec, y, normalize=True, out=None):
        d = real(rec, y, normalize, out)
        calls.append(1)
        if len(calls) == 3:
            d[0, 0] = float('inf')  # a d nu/dW entry
        return d
    monkeypatch.setattr('cbn_mmdet.cbn.layer.derivatives', poisoned)
    outs = _train(conv, layer, [torch.randn(2, 4, 6, 6) for _ in range(8)])
    assert layer.cbn_skipped.item() == 1
    assert all(torch.isfinite(o).all() for o in outs)
    assert torch.isfinite(layer.cbn_dnu[0][:, layer.cbn_valid[0]]).all()
    assert torch.isfinite(layer.running_var).all()


@pytest.mark.parametrize('compensate', [True, False])
def test_channels_last_stays_channels_last_on_the_cuda_branch(compensate):
    conv, layer = _conv_layer(c=8, compensate=compensate)
    conv_cl, layer_cl = copy.deepcopy(conv).to(memory_format=torch.channels_last), copy.deepcopy(layer)
    xs = [torch.randn(2, 4, 9, 9) for _ in range(5)]
    ref = _train(conv, layer, xs)
    emu.CALLS.clear()
    with emu.emulated_cuda_kernels():
        outs = _train(conv_cl, layer_cl, [x.contiguous(memory_format=torch.channels_last) for x in xs])
    assert emu.CALLS and all(f == torch.channels_last for _, fmts in emu.CALLS for f in fmts), \
        {op for op, fmts in emu.CALLS if torch.contiguous_format in fmts}
    for a, b in zip(outs, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # the layer's output keeps the input's layout (the next conv would otherwise copy it back)
    portable = _train(copy.deepcopy(conv).to(memory_format=torch.channels_last), copy.deepcopy(layer),
                      [x.contiguous(memory_format=torch.channels_last) for x in xs])
    for o in outs + portable:
        assert o.is_contiguous(memory_format=torch.channels_last) and not o.is_contiguous()


class _Syncs(TorchDispatchMode):
    """Counts ops that copy a device value to the host (``.item()``, ``float(t)``, ``bool(t)``)."""

    def __init__(self):
        super().__init__()
        self.syncs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.equal.default):
            self.syncs.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize('momentum', [0.1, None])
@pytest.mark.parametrize('compensate', [True, False])
def test_no_host_sync_in_a_training_step(momentum, compensate, kernel_set):
    conv, layer = _conv_layer(momentum=momentum, compensate=compensate)
    bn_conv, bn = copy.deepcopy(conv), nn.BatchNorm2d(6, momentum=momentum)
    xs = [torch.randn(2, 4, 6, 6) for _ in range(6)]
    _train(conv, layer, xs[:4])
    mode = _Syncs()
    with mode:
        _train(conv, layer, xs[4:])
    assert mode.syncs == []
    if momentum is None:  # the cumulative average: same factor 1/num_batches_tracked as BN
        layer_w1 = CrossIterationBatchNorm2d(6, window=1, momentum=None)
        _train(copy.deepcopy(bn_conv), layer_w1, xs)
        _train(bn_conv, bn, xs)
        torch.testing.assert_close(layer_w1.running_var, bn.running_var)
