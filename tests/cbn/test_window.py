"""The window's ring buffer across checkpoints: window_state, another window size, the
checkpoint layout, state_dicts of earlier layouts (version < 3, window inside), load_from."""
import copy
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn

from cbn_mmdet.cbn import CrossIterationBatchNorm2d

F64 = torch.float64


def _pair(window):
    torch.manual_seed(0)
    return nn.Conv2d(3, 5, 3, padding=1).double(), CrossIterationBatchNorm2d(5, window=window, burnin=0).double()


def _batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, 6, 6, generator=g, dtype=F64) for _ in range(n)]


def _old_state_dict(module, prefix='', internal=False, version=2):
    """``module.state_dict()`` as layouts < 3 wrote it: each CBN layer's window inside (in the
    checkpoint layout, or the internal one of 2026-11-29..12-01), metadata version 2."""
    state = OrderedDict(module.state_dict())
    meta = copy.deepcopy(module.state_dict()._metadata)
    layers = [(n, m) for n, m in module.named_modules() if isinstance(m, CrossIterationBatchNorm2d)]
    for name, m in layers:
        p = name + '.' if name else ''
        if internal:
            m.ring.sync()
            state.update({p + k: getattr(m, k).clone() for k in
                          ('cbn_moments', 'cbn_proj', 'cbn_deriv', 'cbn_valid', 'cbn_head')})
        else:
            state.update({p + k: v for k, v in m.window_state().items()})
        meta[name]['version'] = version
    state._metadata = meta
    return state


def _run(conv, layer, xs):
    """Forward + backward without weight updates: every window size stores the same iterations."""
    outs = []
    for x in xs:
        out = layer(conv(x))
        out.sum().backward()
        outs.append(out.detach())
    return outs


@pytest.mark.parametrize('new_window', [2, 3, 8])
def test_loading_another_window_keeps_the_newest_iterations(new_window):
    conv, saved_layer = _pair(4)
    xs = _batches(9)
    _run(conv, saved_layer, xs[:6])                      # 3 stored iterations, the ring wrapped
    state = saved_layer.window_state()

    _, same = _pair(new_window)                          # the same run with the new window
    _run(conv, same, xs[:6])
    fresh = CrossIterationBatchNorm2d(5, window=new_window).double()
    with pytest.warns(UserWarning, match=f'holds 3 stored iterations, this layer keeps '
                                         f'{new_window - 1} .window={new_window}.; kept the newest'):
        fresh.load_window_state(state)
    kept = min(3, new_window - 1)
    assert fresh.cbn_valid.sum().item() == kept and fresh.cbn_moments.shape[1] == new_window - 1
    if new_window <= 4:  # what a layer of that window holds after the same iterations
        for k in ('cbn_moments', 'cbn_proj', 'cbn_deriv', 'cbn_valid'):  # in ring order
            a, b = getattr(fresh, k), getattr(same, k)
            dim = 2 if k == 'cbn_deriv' else 1
            order = lambda t, h: torch.roll(t, -h, dim)  # noqa: E731  oldest first
            torch.testing.assert_close(order(a, fresh.ring.heads[0]), order(b, same.ring.heads[0]), msg=k)
    # it trains on: no IndexError, and pools exactly the kept iterations + the current one
    ref = copy.deepcopy(same) if new_window <= 4 else copy.deepcopy(saved_layer)
    torch.testing.assert_close(_run(conv, fresh, xs[6:7])[0], _run(conv, ref, xs[6:7])[0])
    _run(conv, fresh, xs[7:])


def test_same_window_loads_silently_and_continues_exactly():
    conv, layer = _pair(4)
    xs = _batches(8)
    _run(conv, layer, xs[:5])
    fresh = CrossIterationBatchNorm2d(5, window=4).double()
    with warnings_as_errors():
        fresh.load_state_dict(layer.state_dict())
        fresh.load_window_state(layer.window_state())
    for a, b in zip(_run(conv, fresh, xs[5:]), _run(conv, layer, xs[5:])):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_state_dict_is_batchnorm_plus_two_counters():
    """Layout 3: the state_dict holds BN's keys and cbn_step/cbn_skipped, no window, no tensors
    sharing storage (safetensors refuses those); loading it empties a filled window (it
    described the weights before the load)."""
    conv, layer = _pair(4)
    _run(conv, layer, _batches(5))
    state = layer.state_dict()
    assert set(state) == set(nn.BatchNorm2d(5).state_dict()) | {'cbn_step', 'cbn_skipped'}
    assert state._metadata['']['version'] == 3
    ptrs = [t.untyped_storage().data_ptr() for t in state.values()]
    assert len(set(ptrs)) == len(ptrs)
    other = copy.deepcopy(layer)
    _run(conv, other, _batches(3, seed=2))
    assert other.cbn_valid.sum() == 3
    other.load_state_dict(state)
    assert other.cbn_valid.numel() == 0 and other.cbn_step.item() == 5


def test_window_state_holds_the_checkpoint_layout_of_every_release():
    """One tensor per moment, projection and derivative, float validity (the layout checkpoints
    had before the window became one buffer per kind), equal to what the layer holds, copies on
    the CPU."""
    conv, layer = _pair(4)
    _run(conv, layer, _batches(5))
    state = layer.window_state()
    assert set(state) == {'cbn_mu', 'cbn_nu', 'cbn_wmu', 'cbn_wnu', 'cbn_dmu', 'cbn_dnu',
                          'cbn_valid', 'cbn_head'}
    assert state['cbn_mu'].shape == state['cbn_wnu'].shape == (1, 3, 5)   # (S, E, C)
    assert state['cbn_dnu'].shape == (1, 5, 3, 27) and state['cbn_dmu'].shape == (1, 1, 3, 27)
    assert state['cbn_valid'].dtype == F64 and state['cbn_valid'].sum().item() == 3
    torch.testing.assert_close(torch.stack((state['cbn_mu'], state['cbn_nu']), 2), layer.cbn_moments)
    torch.testing.assert_close(torch.stack((state['cbn_wmu'], state['cbn_wnu']), 2), layer.cbn_proj)
    torch.testing.assert_close(torch.cat((state['cbn_dnu'], state['cbn_dmu']), 1), layer.cbn_deriv)
    assert state['cbn_mu'].untyped_storage().data_ptr() != layer.cbn_moments.untyped_storage().data_ptr()
    assert all(t.device.type == 'cpu' for t in state.values())


@pytest.mark.parametrize('internal', [False, True], ids=['release-layout', 'internal-layout'])
def test_state_dict_of_an_earlier_layout_restores_its_window(internal):
    """state_dicts of layout 2 (the window inside, in the release layout or the internal one
    written 2026-11-29..12-01) load their window and continue exactly; the same keys under
    layout 3 would be unexpected."""
    conv, layer = _pair(4)
    xs = _batches(8)
    _run(conv, layer, xs[:5])
    state = _old_state_dict(layer, internal=internal)
    fresh = CrossIterationBatchNorm2d(5, window=4).double()
    with warnings_as_errors():
        fresh.load_state_dict(state)
    assert fresh.cbn_valid.sum() == 3
    for a, b in zip(_run(conv, fresh, xs[5:]), _run(conv, layer, xs[5:])):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    state._metadata['']['version'] = 3
    with pytest.raises(RuntimeError, match='Unexpected key.*cbn_'):
        CrossIterationBatchNorm2d(5, window=4).double().load_state_dict(state)


def test_load_from_checkpoint_adapts_the_window(tmp_path):
    """mmengine's load_checkpoint (what `load_from` and tools/test.py use) of a layout-2
    checkpoint goes through the layer's own loading: the window is adapted, the run continues."""
    from mmengine.runner.checkpoint import load_checkpoint
    import cbn_mmdet  # noqa: F401  (safe loader for mmengine checkpoints)
    conv, layer = _pair(4)
    model = nn.Sequential(conv, layer)
    xs = _batches(7)
    _run(conv, layer, xs[:5])
    path = tmp_path / 'ckpt.pth'
    torch.save({'state_dict': _old_state_dict(model), 'meta': {}}, path)
    target = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1).double(),
                           CrossIterationBatchNorm2d(5, window=2).double())
    with pytest.warns(UserWarning, match='kept the newest 1'):
        load_checkpoint(target, str(path), map_location='cpu', strict=True)
    assert target[1].cbn_valid.sum().item() == 1
    _run(target[0], target[1], xs[5:])


class warnings_as_errors:
    def __enter__(self):
        import warnings
        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter('error')

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


def test_state_dict_saves_with_safetensors():
    """A trained CBN model's state_dict saves with safetensors and loads back, every tensor
    equal, and a fresh model loads it strictly (the no-shared-storage check is in
    test_state_dict_is_batchnorm_plus_two_counters: safetensors 0.4.5 accepts disjoint views)."""
    st = pytest.importorskip('safetensors.torch')
    model = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), CrossIterationBatchNorm2d(5, window=3, burnin=0),
                          nn.Conv2d(5, 5, 3), CrossIterationBatchNorm2d(5, window=3, burnin=1)).double()
    for x in _batches(4):
        model(x).square().sum().backward()
    state = model.state_dict()
    back = st.load(st.save(state))
    assert set(back) == set(state)
    for k, v in state.items():
        torch.testing.assert_close(back[k], v, rtol=0, atol=0, msg=k)
    fresh = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), CrossIterationBatchNorm2d(5, window=3),
                          nn.Conv2d(5, 5, 3), CrossIterationBatchNorm2d(5, window=3)).double()
    fresh.load_state_dict(back, strict=True)
    assert fresh[3].cbn_step.item() == 4 and torch.equal(fresh[1].running_var, model[1].running_var)
