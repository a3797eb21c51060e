"""CrossIterationBatchNorm2d against the straightforward reference, BatchNorm2d and the truth."""
import copy
import io
import warnings

import pytest
import torch
import torch.nn as nn

from cbn_mmdet.cbn import CrossIterationBatchNorm2d
from tests.cbn.reference import ReferenceCBN
from tests.helpers import FP16_AUTOCAST_CPU

# every test runs on the portable kernels and on the CUDA branch (emulated kernels)
pytestmark = pytest.mark.usefixtures('kernel_set')

F64 = torch.float64
CONVS = {
    '3x3': dict(kernel_size=3, padding=1),
    'strided': dict(kernel_size=3, stride=2, padding=1),
    'dilated': dict(kernel_size=3, padding=2, dilation=2),
    'grouped': dict(kernel_size=3, padding=1, groups=2),
    '1x1': dict(kernel_size=1),
    'biased': dict(kernel_size=3, padding=1, bias=True),
}


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def _weights(c):
    return torch.linspace(0.5, 2.0, c, dtype=F64).view(1, -1, 1, 1)


@pytest.mark.parametrize('window', [2, 3, 4])
@pytest.mark.parametrize('conv_name', list(CONVS))
@pytest.mark.parametrize('compensate', [True, False])
def test_matches_reference_over_sgd_steps(conv_name, window, compensate):
    """Outputs, input gradients, conv-weight gradients and running statistics agree with the
    autograd-derivative reference to 1e-6 relative over 12 SGD steps (float64)."""
    conv = nn.Conv2d(6, 8, **CONVS[conv_name]).double()
    cbn = CrossIterationBatchNorm2d(8, window=window, compensate=compensate,
                                    burnin=0).double()
    with torch.no_grad():
        cbn.weight.uniform_(0.5, 1.5)
        cbn.bias.uniform_(-0.5, 0.5)
    conv_ref = copy.deepcopy(conv)
    gamma = cbn.weight.detach().clone().requires_grad_()
    beta = cbn.bias.detach().clone().requires_grad_()
    ref = ReferenceCBN(8, window, compensate=compensate)
    opt = torch.optim.SGD([*conv.parameters(), *cbn.parameters()], lr=0.01, momentum=0.9)
    opt_ref = torch.optim.SGD([*conv_ref.parameters(), gamma, beta], lr=0.01, momentum=0.9)
    for _ in range(12):
        x = torch.randn(2, 6, 9, 9, dtype=F64) * 1.5 + 0.3
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        out, out_ref = cbn(conv(x1)), ref(conv_ref, x2, gamma, beta)
        target = torch.randn_like(out)
        for o, p in ((out, opt), (out_ref, opt_ref)):
            p.zero_grad()
            (((o - target) ** 2) * _weights(8)).sum().backward()
        assert rel(out, out_ref) < 1e-6
        assert rel(x1.grad, x2.grad) < 1e-6
        assert rel(conv.weight.grad, conv_ref.weight.grad) < 1e-6
        assert rel(cbn.weight.grad, gamma.grad) < 1e-6
        assert rel(cbn.bias.grad, beta.grad) < 1e-6
        assert rel(cbn.running_mean, ref.running_mean) < 1e-6
        assert rel(cbn.running_var, ref.running_var) < 1e-6
        opt.step()
        opt_ref.step()


@pytest.mark.parametrize('burnin', [0, 2])
def test_momentum_none_running_stats_are_the_mean_over_steps_with_a_window(burnin):
    """``momentum=None`` with a window: running mean/var are the plain average, over all steps
    so far, of the window statistics (unbiased with the pooled count), as the reference keeps
    them; with a burn-in the BN steps count as well."""
    conv = nn.Conv2d(3, 5, 3, padding=1).double()
    cbn = CrossIterationBatchNorm2d(5, window=3, burnin=burnin, momentum=None).double()
    conv_ref = copy.deepcopy(conv)
    gamma, beta = cbn.weight.detach().clone(), cbn.bias.detach().clone()
    ref = ReferenceCBN(5, 3, burnin=burnin, momentum=None)
    opt = torch.optim.SGD(conv.parameters(), lr=0.05)
    opt_ref = torch.optim.SGD(conv_ref.parameters(), lr=0.05)
    for step in range(7):
        x = torch.randn(2, 3, 6, 6, dtype=F64) * (1 + step) + step
        out, out_ref = cbn(conv(x)), ref(conv_ref, x, gamma, beta)
        for o, p in ((out, opt), (out_ref, opt_ref)):
            p.zero_grad()
            o.square().sum().backward()
            p.step()
        assert rel(cbn.running_mean, ref.running_mean) < 1e-9
        assert rel(cbn.running_var, ref.running_var) < 1e-9
    assert cbn.num_batches_tracked.item() == 7


def _train_pair(cbn, bn, steps, x_shape=(2, 4, 6, 6), momentum_ref=None):
    """Run conv+cbn and conv+bn side by side with SGD; yield per-step comparisons."""
    conv = nn.Conv2d(x_shape[1], cbn.num_features, 3, padding=1).double()
    conv_bn = copy.deepcopy(conv)
    bn.load_state_dict({k: v for k, v in cbn.state_dict().items() if k in bn.state_dict()})
    opt = torch.optim.SGD([*conv.parameters(), *cbn.parameters()], lr=0.02)
    opt_bn = torch.optim.SGD([*conv_bn.parameters(), *bn.parameters()], lr=0.02)
    for step in range(steps):
        x = torch.randn(*x_shape, dtype=F64)
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        o1, o2 = cbn(conv(x1)), bn(conv_bn(x2))
        g = torch.randn_like(o1)
        o1.backward(g)
        o2.backward(g)
        yield step, (o1, o2), (x1.grad, x2.grad), (conv.weight.grad, conv_bn.weight.grad), \
            (cbn.weight.grad, bn.weight.grad), (cbn.running_mean, bn.running_mean), \
            (cbn.running_var, bn.running_var)
        opt.step()
        opt_bn.step()
        opt.zero_grad()
        opt_bn.zero_grad()


@pytest.mark.parametrize('momentum', [0.1, None])
def test_window_1_is_batchnorm(momentum):
    cbn = CrossIterationBatchNorm2d(5, window=1, momentum=momentum).double()
    bn = nn.BatchNorm2d(5, momentum=momentum).double()
    for step, *pairs in _train_pair(cbn, bn, 6):
        for a, b in pairs:
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert cbn.num_batches_tracked == bn.num_batches_tracked == 6


def test_burnin_iterations_are_batchnorm_then_window_starts():
    """Iterations 0..burnin-1 are BatchNorm2d exactly; the window fills from iteration burnin
    (which therefore pools only itself), so iteration burnin+1 is the first to differ."""
    cbn = CrossIterationBatchNorm2d(5, window=4, burnin=3).double()
    bn = nn.BatchNorm2d(5).double()
    for step, outs, *pairs in _train_pair(cbn, bn, 6):
        if step < 3:
            for a, b in (outs, *pairs):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
        elif step == 3:
            torch.testing.assert_close(*outs)
        else:
            assert rel(*outs) > 1e-3, 'the window is used after the burn-in'
    assert cbn.cbn_step.item() == 6 and not cbn.in_burnin


def test_gradient_accumulation_passes_are_steps_from_the_burnin_on():
    """Forward+backward passes with no optimizer step in between (gradient accumulation: no
    parameter changes): each backward ends a training step, the plain-BN burn-in passes too,
    so the window starts after exactly ``burnin`` passes, as in the reference (whose conv
    does not move either, so compensation is zero)."""
    conv = nn.Conv2d(3, 5, 3, padding=1).double()
    cbn = CrossIterationBatchNorm2d(5, window=3, burnin=2).double()
    bn = nn.BatchNorm2d(5).double()
    gamma, beta = cbn.weight.detach().clone(), cbn.bias.detach().clone()
    ref = ReferenceCBN(5, 3, burnin=2)
    for step in range(6):
        x = torch.randn(2, 3, 6, 6, dtype=F64) * (1 + 0.5 * step) + step
        out, out_ref, out_bn = cbn(conv(x)), ref(conv, x, gamma, beta), bn(conv(x))
        out.square().sum().backward()
        assert cbn.cbn_step.item() == step + 1
        assert cbn.in_burnin == (step + 1 < 2)
        torch.testing.assert_close(out, out_ref.detach(), rtol=1e-9, atol=1e-9)
        if step < 2:
            torch.testing.assert_close(out, out_bn, rtol=0, atol=0)
        elif step > 2:
            assert rel(out, out_bn) > 1e-3, 'the window pools the earlier passes'
    torch.testing.assert_close(cbn.running_mean, ref.running_mean, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(cbn.running_var, ref.running_var, rtol=1e-9, atol=1e-12)
    assert cbn.cbn_valid.sum() == 2


def test_momentum_zero_keeps_the_running_statistics_as_batchnorm_does():
    """``momentum=0.0`` (frozen running statistics) is valid for BatchNorm2d and for CBN: over
    burn-in and windowed SGD steps the running statistics stay at their initial values, equal
    to BatchNorm2d(momentum=0.0)'s, while the outputs follow the reference."""
    conv = nn.Conv2d(3, 5, 3, padding=1).double()
    cbn = CrossIterationBatchNorm2d(5, momentum=0.0, window=3, burnin=2).double()
    bn = nn.BatchNorm2d(5, momentum=0.0).double()
    conv_ref, conv_bn = copy.deepcopy(conv), copy.deepcopy(conv)
    gamma, beta = cbn.weight.detach().clone(), cbn.bias.detach().clone()
    ref = ReferenceCBN(5, 3, burnin=2, momentum=0.0)
    opts = [torch.optim.SGD(c.parameters(), lr=0.05) for c in (conv, conv_ref, conv_bn)]
    for step in range(6):
        x = torch.randn(2, 3, 6, 6, dtype=F64) * 2 + 1
        outs = cbn(conv(x)), ref(conv_ref, x, gamma, beta), bn(conv_bn(x))
        assert rel(outs[0], outs[1]) < 1e-6
        if step < 2:
            torch.testing.assert_close(outs[0], outs[2], rtol=0, atol=0)
        for o, opt in zip(outs, opts):
            opt.zero_grad()
            o.square().sum().backward()
            opt.step()
    assert cbn.cbn_valid.sum() > 0  # the window was used
    for a, b, init in ((cbn.running_mean, bn.running_mean, torch.zeros(5, dtype=F64)),
                       (cbn.running_var, bn.running_var, torch.ones(5, dtype=F64))):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(a, init, rtol=0, atol=0)
    assert cbn.num_batches_tracked == bn.num_batches_tracked == 6


def _true_window_stats(conv, batches):
    with torch.no_grad():
        y = torch.cat([conv(x) for x in batches])
    return y.mean((0, 2, 3)), y.var((0, 2, 3), unbiased=True)


def test_compensation_against_rerun_with_current_weights():
    """One conv, fixed inputs, weights moving ~0.5% per step: the compensated mean equals the
    true mean of the window's batches re-run with the current weights (mean is linear in W),
    and the variance error is >= 10x smaller than plain averaging's."""
    torch.manual_seed(3)
    conv = nn.Conv2d(8, 16, 3, padding=1, bias=False).double()
    batches = [torch.randn(2, 8, 12, 12, dtype=F64) * (1 + 0.3 * i) + 0.5 * i for i in range(8)]
    layers = {c: CrossIterationBatchNorm2d(16, window=4, momentum=1.0, compensate=c).double()
              for c in (True, False)}
    errors = {True: [], False: []}
    for t, x in enumerate(batches):
        if t:
            with torch.no_grad():  # a step of relative size 0.5%
                d = torch.randn_like(conv.weight)
                conv.weight.add_(d * (0.005 * conv.weight.norm() / d.norm()))
        for comp, layer in layers.items():
            layer(conv(x))  # the weight requires grad: the layer reads it off the graph
        if t >= 3:
            mean, var = _true_window_stats(conv, batches[t - 3:t + 1])
            torch.testing.assert_close(layers[True].running_mean, mean, rtol=1e-10, atol=1e-12)
            for comp, layer in layers.items():
                errors[comp].append((layer.running_var - var).abs().max().item())
    assert max(errors[False]) > 0
    ratio = sum(errors[False]) / sum(errors[True])
    assert ratio >= 10, ratio


def test_frozen_conv_makes_plain_averaging_exact():
    conv = nn.Conv2d(4, 6, 3, padding=1).double().requires_grad_(False)
    layer = CrossIterationBatchNorm2d(6, window=3, momentum=1.0).double()
    batches = [torch.randn(2, 4, 7, 7, dtype=F64, requires_grad=True) + i for i in range(5)]
    for t, x in enumerate(batches):
        layer(conv(x)).sum().backward()
        if t >= 2:
            mean, var = _true_window_stats(conv, batches[t - 2:t + 1])
            torch.testing.assert_close(layer.running_mean, mean)
            torch.testing.assert_close(layer.running_var, var)
    assert layer.cbn_dnu.numel() == 0, 'no derivative is computed or stored for a frozen conv'


def test_input_not_from_conv_warns_once_with_name_and_averages():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), CrossIterationBatchNorm2d(4, window=2))
    from cbn_mmdet.cbn import name_cbn_layers
    name_cbn_layers(model)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter('always')
        for _ in range(3):
            model(torch.randn(2, 3, 5, 5)).sum().backward()
    caught = [w for w in rec if 'not from a 2-d conv' in str(w.message)]
    msgs = [str(w.message) for w in caught]
    assert len(msgs) == 1 and "'2'" not in msgs[0] and msgs[0].startswith('2:')
    assert 'ReluBackward0' in msgs[0]
    # attributed to the code that called the model, not to the layer or torch's wrappers
    assert caught[0].filename == __file__, caught[0].filename


def test_no_graph_input_uses_plain_averaging_without_warning():
    layer = CrossIterationBatchNorm2d(3, window=3, momentum=1.0, affine=False, burnin=0).double()
    xs = [torch.randn(2, 3, 4, 4, dtype=F64) + i for i in range(4)]
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        for x in xs:
            layer(x)
    y = torch.cat(xs[1:])
    torch.testing.assert_close(layer.running_mean, y.mean((0, 2, 3)))
    # each call without any gradient is its own step
    assert layer.cbn_step.item() == 4


def test_eval_mode_is_batchnorm_eval():
    layer = CrossIterationBatchNorm2d(4, window=3)
    conv = nn.Conv2d(2, 4, 3)
    for _ in range(5):
        layer(conv(torch.randn(2, 2, 6, 6))).sum().backward()
    bn = nn.BatchNorm2d(4)
    bn.load_state_dict({k: v for k, v in layer.state_dict().items() if k in bn.state_dict()})
    layer.eval(), bn.eval()
    x = torch.randn(3, 4, 5, 5)
    torch.testing.assert_close(layer(x), bn(x), rtol=0, atol=0)
    state = copy.deepcopy(layer.state_dict())
    layer(x)
    for k, v in layer.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0)


def _model(window=3, burnin=0):
    torch.manual_seed(11)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), CrossIterationBatchNorm2d(8, window=window, burnin=burnin),
        nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2),
        CrossIterationBatchNorm2d(8, window=window, burnin=burnin), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)).double()


def _steps(model, opt, data):
    losses = []
    for x, t in data:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), t)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return torch.stack(losses)


def _data(n, seed=5):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(2, 3, 8, 8, generator=g, dtype=F64),
             torch.randint(0, 3, (2,), generator=g)) for _ in range(n)]


def _cbn_layers(model):
    return [m for m in model if isinstance(m, CrossIterationBatchNorm2d)]


def _round_trip(split, with_window):
    """Train ``split`` steps, save (state_dict, optimizer, and the windows if asked), load into a
    fresh model and train the rest; return the losses and the saved state_dict."""
    data = _data(8)
    model = _model(window=4, burnin=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    first = _steps(model, opt, data[:split])
    saved = {'model': model.state_dict(), 'opt': opt.state_dict()}
    if with_window:
        saved['windows'] = [m.window_state() for m in _cbn_layers(model)]
    buf = io.BytesIO()
    torch.save(saved, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    fresh = _model(window=4, burnin=2)
    fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.05, momentum=0.9)
    fresh.load_state_dict(saved['model'])
    fresh_opt.load_state_dict(saved['opt'])
    for m, w in zip(_cbn_layers(fresh), saved.get('windows', ())):
        m.load_window_state(w)
    return torch.cat([first, _steps(fresh, fresh_opt, data[split:])]), saved['model']


def _full_run(reset_at=None):
    data = _data(8)
    model = _model(window=4, burnin=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = _steps(model, opt, data[:reset_at])
    if reset_at is not None:
        for m in _cbn_layers(model):
            m.reset_window()
        losses = torch.cat([losses, _steps(model, opt, data[reset_at:])])
    return losses


@pytest.mark.parametrize('split', [1, 2, 4])
def test_state_dict_round_trip_mid_window(split):
    """Save after `split` steps (mid-burn-in for split=1) with each layer's window_state, load
    into a fresh model, continue: identical to never stopping."""
    losses, _ = _round_trip(split, with_window=True)
    torch.testing.assert_close(losses, _full_run(), rtol=0, atol=0)


@pytest.mark.parametrize('split', [3, 4])
def test_state_dict_alone_resumes_with_an_empty_window(split):
    """The state_dict holds BN's buffers and the two counters, not the window: loaded alone, the
    run goes on past its burn-in with an empty window that refills (window - 1 steps), exactly
    as a run whose windows are emptied at that step, and unlike one that keeps them."""
    losses, state = _round_trip(split, with_window=False)
    assert not [k for k in state if '.cbn_' in k and not k.endswith(('cbn_step', 'cbn_skipped'))]
    torch.testing.assert_close(losses, _full_run(reset_at=split), rtol=0, atol=0)
    assert (losses[split:] - _full_run()[split:]).abs().max() > 1e-6


def test_plain_bn_checkpoint_loads_strict():
    bn_model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    bn_model[1].running_mean.fill_(0.3)
    cbn_model = nn.Sequential(nn.Conv2d(3, 4, 3), CrossIterationBatchNorm2d(4))
    result = cbn_model.load_state_dict(bn_model.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    torch.testing.assert_close(cbn_model[1].running_mean, torch.full((4,), 0.3))


def test_to_moves_window_state_and_dtype():
    """``.double()`` (any ``.to()``) keeps every stored value and the step bookkeeping: the next
    step equals that of a copy that stayed float32 (to float32 accuracy), and the state
    round-trips back to float32 bit for bit."""
    layer = CrossIterationBatchNorm2d(4, window=3)
    conv = nn.Conv2d(2, 4, 3)
    for _ in range(3):
        layer(conv(torch.randn(2, 2, 5, 5))).sum().backward()
    stay, stay_conv = copy.deepcopy(layer), copy.deepcopy(conv)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    layer, conv = layer.double(), conv.double()
    assert layer.cbn_dnu.dtype == F64 and layer.cbn_mu.dtype == F64
    for k, v in layer.state_dict().items():  # values moved, not reset
        torch.testing.assert_close(v.to(before[k].dtype), before[k], rtol=0, atol=0)
    back = copy.deepcopy(layer).float()
    for k, v in back.state_dict().items():
        assert v.dtype == before[k].dtype
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    x = torch.randn(2, 2, 5, 5)
    out, ref = layer(conv(x.double())), stay(stay_conv(x))
    assert out.dtype == F64 and layer.cbn_step.item() == 4 == stay.cbn_step.item()
    torch.testing.assert_close(out.float(), ref, rtol=1e-4, atol=1e-4)
    assert layer.cbn_valid.sum() == stay.cbn_valid.sum() == 2


@pytest.mark.parametrize('kwargs,option', [
    (dict(window=0), 'window'), (dict(window=2.5), 'window'), (dict(window=True), 'window'),
    (dict(burnin=-1), 'burnin'), (dict(burnin='8'), 'burnin'),
    (dict(compensate='yes'), 'compensate'), (dict(compensate=1), 'compensate'),
    (dict(eps=0), 'eps'), (dict(eps=-1e-5), 'eps'),
    (dict(momentum=1.5), 'momentum'), (dict(momentum='0.1'), 'momentum'),
    (dict(affine=1), 'affine'), (dict(track_running_stats=None), 'track_running_stats'),
])
def test_bad_options_name_the_option(kwargs, option):
    with pytest.raises(ValueError, match=f'`{option}`'):
        CrossIterationBatchNorm2d(8, **kwargs)


@pytest.mark.parametrize('cls', ['CBN', 'SyncCBN'])
def test_misspelt_option_lists_the_valid_ones(cls):
    from cbn_mmdet.cbn import SyncCrossIterationBatchNorm2d
    layer_cls = CrossIterationBatchNorm2d if cls == 'CBN' else SyncCrossIterationBatchNorm2d
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['windw'\]; valid options: eps, "
                                         r"momentum, affine, track_running_stats, window, burnin"):
        layer_cls(8, windw=4)


def test_wrong_input_rank_is_rejected():
    with pytest.raises(ValueError, match='4-d'):
        CrossIterationBatchNorm2d(3)(torch.randn(2, 3, 4))


@pytest.mark.parametrize('dtype', [torch.bfloat16, FP16_AUTOCAST_CPU])
def test_cpu_autocast_keeps_float32_statistics(dtype):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 8, 3, padding=1)
    layer = CrossIterationBatchNorm2d(8, window=3)
    ref_conv, ref_layer = copy.deepcopy(conv), copy.deepcopy(layer)
    for _ in range(4):
        x = torch.randn(2, 4, 8, 8)
        with torch.autocast('cpu', dtype=dtype):
            out = layer(conv(x))
        assert out.dtype == dtype
        out.float().sum().backward()
        ref = ref_layer(ref_conv(x))
        ref.sum().backward()
        assert (out.float() - ref).abs().max() < 0.1
    assert layer.cbn_mu.dtype == torch.float32 and layer.cbn_dnu.dtype == torch.float32
    assert rel(layer.cbn_dnu, ref_layer.cbn_dnu) < 0.05
    assert rel(layer.running_var, ref_layer.running_var) < 0.02
    assert conv.weight.grad is not None and torch.isfinite(conv.weight.grad).all()


def _train_two_steps(*layers):
    for _ in range(2):
        for layer in layers:
            conv = nn.Conv2d(3, layer.num_features, 3)
            layer(conv(torch.randn(2, 3, 6, 6))).sum().backward()


def test_window_without_burnin_warns_once_per_process(monkeypatch, recwarn):
    """No `burnin` given and no CBNHook: the first layer to start its window says so once for
    the process, counting the layers in that case; `burnin=0` given, window 1, or a layer
    configured by CBNHook stay silent."""
    import cbn_mmdet.cbn.layer as layer_mod
    monkeypatch.setattr(layer_mod, '_warned_no_burnin', False)
    quiet = [CrossIterationBatchNorm2d(4, burnin=0), CrossIterationBatchNorm2d(4, window=1)]
    hooked = CrossIterationBatchNorm2d(4)
    hooked.configured_by_hook = True
    _train_two_steps(*quiet, hooked)
    assert not [w for w in recwarn if 'no burn-in' in str(w.message)]
    loud = [CrossIterationBatchNorm2d(4), CrossIterationBatchNorm2d(4)]
    _train_two_steps(*loud)
    caught = [w for w in recwarn if 'no burn-in' in str(w.message)]
    msgs = [str(w.message) for w in caught]
    assert len(msgs) == 1, msgs
    assert caught[0].filename == __file__, caught[0].filename  # not torch's compiler wrapper
    count = int(msgs[0].split()[0])  # the layers alive in the process in that case: these two
    assert count >= 2 and "type='CBNHook'" in msgs[0] and 'burnin=0' in msgs[0]  # (and leftovers)
