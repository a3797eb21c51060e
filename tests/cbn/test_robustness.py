"""Empty batches, non-finite inputs, several calls per step, accumulation and checkpointing."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.utils.checkpoint as cp

from cbn_mmdet.cbn import CrossIterationBatchNorm2d
from tests.cbn.reference import ReferenceCBN

# every test runs on the portable kernels and on the CUDA branch (emulated kernels)
pytestmark = pytest.mark.usefixtures('kernel_set')

F64 = torch.float64


def _conv_cbn(window=3, c_in=3, c=4):
    return nn.Conv2d(c_in, c, 3, padding=1).double(), \
        CrossIterationBatchNorm2d(c, window=window).double()


def test_empty_batch_does_not_touch_state():
    conv, layer = _conv_cbn()
    for _ in range(3):
        layer(conv(torch.randn(2, 3, 5, 5, dtype=F64))).sum().backward()
    state = copy.deepcopy(layer.state_dict())
    out = layer(conv(torch.randn(0, 3, 5, 5, dtype=F64)))
    assert out.shape == (0, 4, 5, 5)
    out.sum().backward()
    assert torch.isfinite(layer.weight.grad).all()
    for k, v in layer.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0)


def test_non_finite_batch_never_enters_the_window():
    conv, layer = _conv_cbn(window=3)
    for _ in range(3):
        layer(conv(torch.randn(2, 3, 5, 5, dtype=F64))).sum().backward()
    bad = torch.randn(2, 3, 5, 5, dtype=F64)
    bad[0, 0, 0, 0] = float('nan')
    out = layer(conv(bad))
    assert torch.isnan(out).any()  # this iteration is lost, as with BatchNorm
    assert layer.cbn_skipped.item() == 1
    valid = layer.cbn_valid[0] > 0
    assert valid.tolist().count(False) == 1  # the slot it took is marked empty
    for name in ('cbn_mu', 'cbn_nu', 'cbn_wmu', 'cbn_wnu'):
        assert torch.isfinite(getattr(layer, name)[0][valid]).all(), name
    assert torch.isfinite(layer.cbn_dnu[0][:, valid]).all()
    assert torch.isfinite(layer.running_mean).all() and torch.isfinite(layer.running_var).all()
    conv.zero_grad()
    for _ in range(4):
        out = layer(conv(torch.randn(2, 3, 5, 5, dtype=F64)))
        assert torch.isfinite(out).all()
        out.sum().backward()


def test_shared_module_keeps_one_window_per_call_position():
    """A head shared across two 'levels' (called twice per step): the i-th call of each step
    pools only with the i-th calls of earlier steps, as two separate layers would."""
    conv, shared = _conv_cbn(window=3)
    conv_a, layer_a = copy.deepcopy(conv), copy.deepcopy(shared)
    conv_b, layer_b = copy.deepcopy(conv), copy.deepcopy(shared)
    for step in range(5):
        xa = torch.randn(2, 3, 8, 8, dtype=F64)
        xb = torch.randn(2, 3, 4, 4, dtype=F64) * 3 + 2
        oa, ob = shared(conv(xa)), shared(conv(xb))
        ra, rb = layer_a(conv_a(xa)), layer_b(conv_b(xb))
        torch.testing.assert_close(oa, ra)
        torch.testing.assert_close(ob, rb)
        (oa.sum() + ob.sum()).backward()
        (ra.sum()).backward()
        rb.sum().backward()
        with torch.no_grad():  # identical SGD step on each copy of the conv
            for c in (conv, conv_a, conv_b):
                c.weight -= 0.01 * (conv.weight.grad if c is conv else
                                    conv_a.weight.grad + conv_b.weight.grad)
            for c in (conv, conv_a, conv_b):
                c.zero_grad()
    assert shared.cbn_mu.shape[0] == 2 and shared.cbn_step.item() == 5


def test_gradient_accumulation_treats_micro_batches_as_iterations():
    """Several forward/backward passes before one optimizer step: each micro-batch is an
    iteration of the window (the weight did not change, so nothing needs compensating)."""
    conv, layer = _conv_cbn(window=3)
    ref_conv = copy.deepcopy(conv)
    gamma, beta = layer.weight.detach().clone(), layer.bias.detach().clone()
    ref = ReferenceCBN(4, window=3)
    for _ in range(5):
        x = torch.randn(2, 3, 6, 6, dtype=F64)
        out = layer(conv(x))
        out.sum().backward()
        torch.testing.assert_close(out, ref(ref_conv, x, gamma, beta))
    assert layer.cbn_step.item() == 5


def _net(window, compensate=True):
    torch.manual_seed(4)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        CrossIterationBatchNorm2d(6, window=window, compensate=compensate), nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=1),
        CrossIterationBatchNorm2d(6, window=window, compensate=compensate)).double()


@pytest.mark.parametrize('reentrant', [True, False])
def test_activation_checkpointing_trains_exactly_as_without_it(reentrant):
    """Both checkpointing modes: the first forward cannot read the conv's input (reentrant: no
    graph; non-reentrant: saved-tensor hooks), so the iteration's derivatives are completed in
    the recomputation; outputs, gradients and the whole state match the model run without
    checkpointing over SGD steps, with no warning, and the window was compensated."""
    ckpt = checkpointed_equals_uncheckpointed(reentrant)
    assert ckpt[1].cbn_deriv.abs().sum() > 0


def checkpointed_equals_uncheckpointed(reentrant, steps=6):
    """``steps`` SGD steps of a checkpointed CBN net against the same net without checkpointing,
    and against the plain-averaging net (which it must not equal); returns the checkpointed."""
    eager, ckpt, plain = _net(3), _net(3), _net(3, compensate=False)
    nets = (eager, ckpt, plain)
    for net in nets:
        for m in net:
            if isinstance(m, CrossIterationBatchNorm2d):
                m.burnin = 1
    opts = [torch.optim.SGD(n.parameters(), lr=0.2) for n in nets]
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # no fallback warning of ours, nor torch's
        for _ in range(steps):
            x = torch.randn(2, 3, 6, 6, dtype=F64, requires_grad=True)
            outs = (eager(x), cp.checkpoint(ckpt, x, use_reentrant=reentrant), plain(x))
            torch.testing.assert_close(outs[1], outs[0], rtol=1e-9, atol=1e-10)
            for o, opt in zip(outs, opts):
                opt.zero_grad()
                o.square().sum().backward()
            for a, b in zip(ckpt.parameters(), eager.parameters()):
                torch.testing.assert_close(a.grad, b.grad, rtol=1e-8, atol=1e-10)
            for opt in opts:
                opt.step()
    for name, a in ckpt.state_dict().items():
        torch.testing.assert_close(a, eager.state_dict()[name], rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(ckpt[1].cbn_moments, eager[1].cbn_moments, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(ckpt[1].cbn_deriv, eager[1].cbn_deriv, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(ckpt[1].cbn_proj, eager[1].cbn_proj, rtol=1e-8, atol=1e-10)
    assert (outs[1] - outs[2]).abs().max() > 1e-6  # compensation made a difference
    return ckpt


def test_saved_tensor_hooks_without_recomputation_warn_once_per_layer():
    """Saved-tensor hooks that never recompute (``save_on_cpu``): the conv's input cannot be
    read in the forward and no recomputation completes the iteration, so each layer says once
    that such iterations are stored uncompensated; the layers then match plain averaging for
    those iterations only where nothing else differs (here: every iteration)."""
    net, plain = _net(3), _net(3, compensate=False)
    for n in (net, plain):
        for m in n:
            if isinstance(m, CrossIterationBatchNorm2d):
                m.burnin = 0
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter('always')
        for _ in range(4):
            x = torch.randn(2, 3, 6, 6, dtype=F64, requires_grad=True)
            with torch.autograd.graph.save_on_cpu():
                out = net(x)
            out_p = plain(x)
            torch.testing.assert_close(out, out_p)
            for o in (out, out_p):
                o.square().sum().backward()
    msgs = [str(w.message) for w in rec if 'did not recompute' in str(w.message)]
    assert len(msgs) == 2, msgs
    assert len({m.split(' ran under')[0] for m in msgs}) == 2  # one per layer


def test_too_many_calls_without_backward_warn_and_start_new_steps():
    """Training-mode calls with gradients on but no backward (an evaluation loop left in train
    mode): the first 16 are one step's streams; then one warning, and every further call is a
    step of its own that pools with the previous calls, until a backward pass resets this."""
    conv, layer = _conv_cbn(window=2)
    xs = [torch.randn(2, 3, 4, 4, dtype=F64) * (i + 1) for i in range(21)]
    with pytest.warns(UserWarning, match='no backward pass') as caught:
        outs = [layer(conv(x)) for x in xs[:20]]
    assert len([w for w in caught if 'no backward pass' in str(w.message)]) == 1
    assert layer.cbn_step.item() == 1 + 4  # calls 17..20 each began a step
    assert layer.cbn_mu.shape[0] <= 16
    # call 20 pooled with call 19 (stream 0, window 2; the weights did not change)
    with torch.no_grad():
        y19, y20 = conv(xs[18]), conv(xs[19])
        mean = (y19.mean((0, 2, 3)) + y20.mean((0, 2, 3))) / 2
        var = ((y19 * y19).mean((0, 2, 3)) + (y20 * y20).mean((0, 2, 3))) / 2 - mean * mean
        expected = (y20 - mean.view(1, -1, 1, 1)) / (var + layer.eps).sqrt().view(1, -1, 1, 1)
    torch.testing.assert_close(outs[19].detach(), expected)
    # a backward pass ends the overflow: the next call starts one step, later ones join it
    outs[19].sum().backward()
    layer(conv(xs[20]))
    layer(conv(xs[20]))
    assert layer.cbn_step.item() == 6
