"""The layer on every torch we support: each private or version-dependent API removed in turn,
training steps still match the straightforward reference (or the path that uses the API)."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn

from cbn_mmdet.cbn import CrossIterationBatchNorm2d, compat
from tests.cbn.reference import ReferenceCBN
from tests.cbn.test_robustness import checkpointed_equals_uncheckpointed

F64 = torch.float64


@pytest.fixture(autouse=True)
def _restore_compat():
    yield
    compat.resolve()


def _sgd_steps_against_reference(steps=6, window=3):
    """Windowed CBN (conv input, compensation on) against the reference over SGD steps."""
    conv = nn.Conv2d(3, 5, 3, padding=1).double()
    cbn = CrossIterationBatchNorm2d(5, window=window).double()
    conv_ref = copy.deepcopy(conv)
    gamma = cbn.weight.detach().clone().requires_grad_()
    beta = cbn.bias.detach().clone().requires_grad_()
    ref = ReferenceCBN(5, window)
    opt = torch.optim.SGD([*conv.parameters(), *cbn.parameters()], lr=0.05)
    opt_ref = torch.optim.SGD([*conv_ref.parameters(), gamma, beta], lr=0.05)
    for _ in range(steps):
        x = torch.randn(2, 3, 7, 7, dtype=F64)
        out, out_ref = cbn(conv(x)), ref(conv_ref, x, gamma, beta)
        torch.testing.assert_close(out, out_ref)
        for o, opt_ in ((out, opt), (out_ref, opt_ref)):
            opt_.zero_grad()
            o.square().sum().backward()
        torch.testing.assert_close(conv.weight.grad, conv_ref.weight.grad)
        opt.step()
        opt_ref.step()
    torch.testing.assert_close(cbn.running_var, ref.running_var)
    return cbn


@pytest.mark.parametrize('api', compat.PRIVATE_APIS)
def test_training_steps_without_each_private_api(monkeypatch, api):
    """The API deleted from torch (any call of it would raise AttributeError): a windowed
    training step with compensation, the default, still matches the reference exactly."""
    owner = torch._C._autograd if api == '_top_saved_tensors_default_hooks' else torch._C
    monkeypatch.delattr(owner, api, raising=False)
    chosen = compat.resolve()
    assert 'private' not in chosen[{'_top_saved_tensors_default_hooks': 'saved_tensors_hooks_active',
                                    '_current_graph_task_id': 'in_backward_recompute'}[api]]
    cbn = _sgd_steps_against_reference()
    assert cbn.cbn_valid.sum() > 0  # the window was used


@pytest.mark.parametrize('reentrant', [True, False])
def test_activation_checkpointing_with_the_fallbacks(reentrant):
    """Both private APIs replaced by the tracked fallbacks (torch's own checkpointing still
    calls them on new torch, so they are not deleted here): a checkpointed model recomputes
    without counting a step twice and trains exactly as without checkpointing."""
    chosen = compat.resolve(missing=compat.PRIVATE_APIS)
    assert chosen['saved_tensors_hooks_active'] == '_top_hooks_tracked'
    assert chosen['in_backward_recompute'] == '_in_recompute_tracked'
    ckpt = checkpointed_equals_uncheckpointed(reentrant, steps=5)
    assert ckpt[1].cbn_step.item() == 5  # one step per iteration: no recomputation counted


def test_tracked_hooks_agree_with_the_private_api():
    """Where torch has the private API, the tracker reads the same in and out of hooks."""
    if not hasattr(torch._C._autograd, '_top_saved_tensors_default_hooks'):
        pytest.skip('this torch has no _top_saved_tensors_default_hooks to compare with')
    compat.resolve(missing=compat.PRIVATE_APIS)
    tracked = compat.saved_tensors_hooks_active
    private = compat._top_hooks_private
    assert tracked() is private() is False
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        assert tracked() is private() is True
        with torch.autograd.graph.save_on_cpu():
            assert tracked() is private() is True
        assert tracked() is private() is True
    assert tracked() is private() is False


def test_autocast_query_without_the_device_argument():
    """torch < 2.4: ``is_autocast_enabled`` takes no argument (the CPU flag has its own query).
    With the legacy queries, a CPU autocast step still turns autocast off for the statistics:
    the same outputs and window as with 2.4's API. (On new torch the legacy CPU query is
    deprecated, hence the filter; torch's own autocast needs the new one, so it stays.)"""
    def run():
        torch.manual_seed(0)
        conv, layer = nn.Conv2d(4, 8, 3, padding=1), CrossIterationBatchNorm2d(8, window=3)
        outs = []
        for _ in range(3):
            x = torch.randn(2, 4, 8, 8)
            with torch.autocast('cpu', dtype=torch.bfloat16):
                out = layer(conv(x))
            out.float().sum().backward()
            outs.append(out)
        return outs, layer
    expected, ref_layer = run()
    assert compat.resolve(missing={'autocast_device_arg'})['autocast_enabled'] == \
        '_autocast_enabled_legacy'
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', DeprecationWarning)
        got, layer = run()
        with torch.autocast('cpu', dtype=torch.bfloat16):
            assert compat.autocast_enabled('cpu') and not compat.autocast_enabled('cuda')
        assert not compat.autocast_enabled('cpu')
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(layer.cbn_nu, ref_layer.cbn_nu, rtol=0, atol=0)


def test_mixed_dtype_addcmul_fallback_is_bit_identical():
    """torch 2.1's CPU ``addcmul_`` asserts on a bf16 tensor with a float32 operand; the fallback
    computes in float32 and rounds once, as the in-place op does on newer torch."""
    def grads():
        torch.manual_seed(1)
        conv = nn.Conv2d(4, 8, 3, padding=1).bfloat16()
        layer = CrossIterationBatchNorm2d(8, window=3).bfloat16()
        out = []
        for _ in range(3):
            x = torch.randn(2, 4, 6, 6, dtype=torch.bfloat16, requires_grad=True)
            layer(conv(x)).float().square().sum().backward()
            out.append(x.grad)
        return out
    if compat._mixed_addcmul_works():
        expected = grads()
    compat.resolve(missing={'mixed_addcmul'})
    assert compat.addcmul_into is compat._addcmul_upcast
    got = grads()
    if compat._mixed_addcmul_works():
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    a = torch.randn(3, dtype=torch.bfloat16)
    b = torch.randn(3)
    out = torch.randn(3, dtype=torch.bfloat16)
    want = (out.float() + a.float() * b).bfloat16()
    torch.testing.assert_close(compat._addcmul_upcast(out, a, b), want, rtol=0, atol=0)


def test_resolve_rejects_unknown_capability():
    with pytest.raises(ValueError, match='unknown capabilities'):
        compat.resolve(missing={'nope'})


_TRACKED_IN_FRESH_PROCESS = '''
import importlib.util, json, sys
import torch
import torch.utils.checkpoint as checkpoint
spec = importlib.util.spec_from_file_location('compat', 'cbn_mmdet/cbn/compat.py')
compat = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compat)
chosen = compat.resolve(missing=[sys.argv[1]])
out = dict(chosen=chosen, outside=compat.saved_tensors_hooks_active())
with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
    out['inside'] = compat.saved_tensors_hooks_active()
out['after'] = compat.saved_tensors_hooks_active()
seen = []
def f(x):
    seen.append(compat.in_backward_recompute())
    return x.sin() * 2
x = torch.randn(3, requires_grad=True)
checkpoint.checkpoint(f, x, use_reentrant=True).sum().backward()
out['forward'], out['recompute'] = seen
print(json.dumps(out))
'''


@pytest.mark.parametrize('api', compat.PRIVATE_APIS)
def test_one_missing_private_api_gets_a_working_tracker(api):
    """Either private API missing alone: the fallback chosen for it reads the truth (inside
    saved-tensor hooks or not; in a reentrant checkpoint's recomputation or in the plain
    forward). The tracker patches torch once per process, so each case starts in a fresh
    interpreter, loading compat.py alone (the package's import would add mmengine's seconds)."""
    import json
    import os
    import sys

    from tests.multiproc import run_split
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    rc, out, err = run_split([sys.executable, '-c', _TRACKED_IN_FRESH_PROCESS, api], cwd=root,
                             deadline=120)
    assert rc == 0, err[-3000:]
    got = json.loads(out.strip().splitlines()[-1])
    fallback = {'_top_saved_tensors_default_hooks': ('saved_tensors_hooks_active', '_top_hooks_tracked'),
                '_current_graph_task_id': ('in_backward_recompute', '_in_recompute_tracked')}[api]
    assert got['chosen'][fallback[0]] == fallback[1]
    assert (got['outside'], got['inside'], got['after']) == (False, True, False)
    assert (got['forward'], got['recompute']) == (False, True)
