"""``import cbn_mmdet`` changes nothing for code that does not use CBN (docs/install.md, "What
importing cbn_mmdet changes"): third-party checkpoints load (or fail) as without the plugin,
torch's activation checkpointing and saved-tensor hooks of a model without CBN give the same
bits and warnings, mmengine's ``convert_sync_batchnorm`` converts such a model as before, and
the registries only gain our names.

Each comparison is between two fresh processes (tests/import_side_effects_probe.py), without
and with the plugin; the second one repeats everything once a CBN layer is built (whatever the
layer installs on this torch is then in place).
"""
import collections
import fractions
import json
import os
import sys

import numpy as np
import pytest
import torch

from tests.multiproc import run_many

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = os.path.join(ROOT, 'tests', 'import_side_effects_probe.py')
MODES = ('none', 'plugin')
OUR_NAMES = {'mmengine.MODELS': {'CBN', 'CrossIterationBatchNorm2d', 'SyncCBN',
                                 'SyncCrossIterationBatchNorm2d'},
             'mmengine.HOOKS': {'CBNHook', 'SeedPerIterationHook', 'CBNStatsProbeHook',
                                'PreciseStatsHook'}}


def _write_checkpoints(d):
    """Third-party checkpoints (none of them made by this package) and one CBN checkpoint."""
    from mmengine.logging import MessageHub

    from tests.import_side_effects_probe import plain_model
    state = plain_model().state_dict()
    torch.save(state, d / 'plain_state_dict.pth')  # a torchvision-style state_dict
    release_meta = dict(mmdet_version='3.3.0', CLASSES=('cat', 'dog'), epoch=12, iter=87960,
                        dataset_meta=dict(classes=('cat', 'dog'), palette=[(220, 20, 60), (0, 0, 142)]),
                        config="model = dict(type='FasterRCNN')", env_info='sys.platform: linux',
                        time='Sun Jul  2 12:00:00 2023', seed=0, mmengine_version='0.10.7')
    torch.save(dict(meta=release_meta, state_dict=state), d / 'release.pth')  # publish_model's keys
    hub = MessageHub.get_instance('side-effects-hub')
    hub.update_scalar('train/loss', 0.5)
    hub.update_info('iter', 3)
    trained = dict(meta=dict(release_meta, seed=np.int64(7), arr=np.arange(3)), state_dict=state,
                   message_hub=hub.state_dict(),
                   optimizer=torch.optim.SGD(plain_model().parameters(), lr=0.1).state_dict())
    torch.save(trained, d / 'mmengine_trained.pth')  # a BN model trained by mmengine's runner
    torch.save(dict(state_dict=state, meta=fractions.Fraction(1, 3)), d / 'other_type.pth')
    (d / 'corrupt.pth').write_bytes(b'not a checkpoint at all')
    cbn_state = collections.OrderedDict(state)
    cbn_state['1.cbn_step'] = torch.tensor(5)
    cbn_state['1.cbn_skipped'] = torch.tensor(0)
    torch.save(dict(trained, state_dict=cbn_state, cbn_window={'1': {}}), d / 'cbn_trained.pth')


@pytest.fixture(scope='module')
def reports(tmp_path_factory):
    """Both probes at once (two fresh processes, each in its own process group, under one
    deadline)."""
    d = tmp_path_factory.mktemp('side_effects')
    _write_checkpoints(d)
    outs = {mode: d / f'report_{mode}.json' for mode in MODES}
    results = run_many([[sys.executable, PROBE, mode, str(d), str(outs[mode])] for mode in MODES],
                       cwd=ROOT, deadline=240, what=[f'import side-effects probe ({m})' for m in MODES])
    for mode, (rc, log) in zip(MODES, results):
        assert rc == 0, f'{mode}: {log[-4000:]}'
    return {mode: json.loads(outs[mode].read_text()) for mode in MODES}


def _section(reports, variant, name):
    """A report section: ``variant`` 'none', 'plugin', 'cbn' (the plugin's process once a CBN
    layer exists) or 'tracked' (then with both private APIs treated as missing: every wrapper
    of the tracker in place, on any torch)."""
    if variant in ('cbn', 'tracked'):
        return reports['plugin'][variant][name]
    return reports[variant][name]


def _differences(a, b, prefix=''):
    """Keys whose values differ between two report sections (for readable failures)."""
    keys = list(dict.fromkeys(list(a) + list(b)))
    return [f'{prefix}{k}: {a.get(k)!r:.300} != {b.get(k)!r:.300}' for k in keys if a.get(k) != b.get(k)]


def test_third_party_checkpoints_load_or_fail_as_without_the_plugin(reports):
    """Through mmengine's CheckpointLoader and load_checkpoint: the same objects (bit for bit)
    or the same exception type and message, for a plain state_dict, a release checkpoint
    (meta + state_dict), an mmengine-trained BN checkpoint (message hub, numpy: refused by
    torch >= 2.6's safe loading, without the plugin too), other pickled types, a corrupt and a
    missing file."""
    none = {k: v for k, v in reports['none']['loading'].items() if not k.startswith('cbn_trained')}
    for mode in ('plugin', 'cbn'):
        got = {k: v for k, v in _section(reports, mode, 'loading').items()
               if not k.startswith('cbn_trained')}
        assert got == none, '\n'.join(_differences(got, none))
    outcomes = {k: v[0] for k, v in none.items()}
    assert outcomes['plain_state_dict: CheckpointLoader'] == outcomes['release: load_checkpoint'] == 'ok'
    assert outcomes['missing: CheckpointLoader'] == outcomes['corrupt: CheckpointLoader'] == 'raised'
    safe_by_default = reports['none']['loading']['other_type: CheckpointLoader'][0] == 'raised'
    assert outcomes['mmengine_trained: CheckpointLoader'] == ('raised' if safe_by_default else 'ok')


def test_cbn_checkpoints_and_our_runners_allow_mmengine_types(reports):
    """The one difference: a CBN checkpoint that torch's safe loading refuses only for
    mmengine's types loads with the plugin. In our runners (and with CBNHook) every mmengine
    checkpoint does, and every file mmengine loads gives the same objects there too."""
    key = 'cbn_trained: CheckpointLoader'
    without, with_ = reports['none']['loading'][key], reports['plugin']['loading'][key]
    assert with_[0] == 'ok'
    if without[0] == 'raised':  # torch >= 2.6
        assert 'Unsupported global' in without[2]
    else:  # older torch loads everything without the plugin's help
        assert with_ == without
    ours = reports['plugin']['loading in our runners']
    for name in ('mmengine_trained', 'cbn_trained'):
        assert ours[f'{name}: CheckpointLoader'][0] == 'ok'
    none = reports['none']['loading']
    for k, v in none.items():
        if v[0] == 'ok':
            assert ours[k] == v, k
    assert ours['other_type: CheckpointLoader'] == none['other_type: CheckpointLoader']


def test_torch_checkpointing_of_a_model_without_cbn_is_bit_identical(reports):
    """Reentrant and non-reentrant checkpointing, checkpoint_sequential, save_on_cpu, one's own
    saved_tensors_hooks and all nested: outputs, gradients, buffers, the tensors packed and the
    warnings (message, file and line) are the same, and so are the errors raised through those
    mechanisms -- with the plugin imported, once a CBN layer is built, and with all of the
    tracker's wrappers in place (what a torch without either private API gets)."""
    for mode in ('plugin', 'cbn', 'tracked'):
        for section in ('training', 'errors'):
            got, want = _section(reports, mode, section), reports['none'][section]
            assert got == want, '\n'.join(_differences(got, want, f'{mode} {section} '))
    tracked = _section(reports, 'tracked', 'patched')
    assert tracked['saved_tensors_hooks.__enter__'].startswith('cbn_mmdet/')  # wrappers in place
    if 'CheckpointFunction.backward' in tracked:
        assert tracked['CheckpointFunction.backward'].startswith('cbn_mmdet/')
    errors = reports['none']['errors']
    assert errors['hooks while disabled'] == ['raised', 'builtins.RuntimeError', 'no saved-tensor hooks here']
    assert errors['autograd.grad through reentrant'][0] == 'raised'
    assert errors['raise inside hooks'][0] == 'ok'


def test_import_patches_no_torch_function(reports):
    """Importing patches none of torch's classes; building a CBN layer wraps
    saved_tensors_hooks' enter/exit only on a torch without _top_saved_tensors_default_hooks
    (< 2.8), and the reentrant checkpoint's backward only without _current_graph_task_id."""
    none, plugin, cbn = (_section(reports, m, 'patched') for m in ('none', 'plugin', 'cbn'))
    torch_keys = [k for k in none if not k.endswith('convert_sync_batchnorm') and k != 'checkpoint loaders']
    assert {k: plugin[k] for k in torch_keys} == {k: none[k] for k in torch_keys}
    assert all(v.startswith('torch/') for k in torch_keys for v in [none[k]])
    needs = {'hooks': not (hasattr(torch._C._autograd, '_top_saved_tensors_default_hooks')
                           and hasattr(torch._C, '_current_graph_task_id')),
             'backward': not hasattr(torch._C, '_current_graph_task_id')}
    assert reports['plugin']['tracker at import'] == {'hooks': False, 'backward': False}
    assert reports['plugin']['tracker'] == needs
    for k in torch_keys:
        wrapped = needs['backward'] if k.startswith('CheckpointFunction') else needs['hooks']
        assert cbn[k].startswith('cbn_mmdet/') == wrapped, (k, cbn[k])


def test_a_cbn_layer_installs_the_tracker_when_built(reports):
    """The tracker must be in place before any forward of a CBN layer can run under saved-tensor
    hooks: building the layer installs it (CrossIterationBatchNorm2d.__init__ calls
    compat.ensure_tracker())."""
    assert reports['plugin']['tracker after a layer is built'] == reports['plugin']['tracker']


def test_mmengine_loaders_and_converters_that_change(reports):
    """Only mmengine's local-file loader (on torch >= 2.5) and the two runner-side names of
    convert_sync_batchnorm are rebound; mmengine.model's function is mmengine's own."""
    none, plugin = reports['none']['patched'], reports['plugin']['patched']
    loaders = dict(none['checkpoint loaders'])
    if hasattr(torch.serialization, 'safe_globals'):
        loaders[''] = 'cbn_mmdet/engine/checkpoint.py:load_from_local_safe'
    assert plugin['checkpoint loaders'] == loaders
    for name in ('mmengine.model', 'mmengine.model.utils'):
        assert plugin[f'{name}.convert_sync_batchnorm'] == none[f'{name}.convert_sync_batchnorm']
    for name in ('mmengine.runner.runner', 'mmengine._strategy.distributed'):
        assert plugin[f'{name}.convert_sync_batchnorm'] == \
            'cbn_mmdet/engine/sync_bn_guard.py:convert_sync_batchnorm'


def test_convert_sync_batchnorm_of_a_model_without_cbn_is_unchanged(reports):
    """Every name of mmengine's converter (and torch's): the same module types, the same
    parameters (the very objects), the same state, the same errors, name and docstring."""
    for mode in ('plugin', 'cbn'):
        got, want = _section(reports, mode, 'sync_bn'), reports['none']['sync_bn']
        assert got == want, '\n'.join(_differences(got, want, f'{mode} '))
    res = reports['none']['sync_bn']['mmengine.runner.runner']
    assert res[0] == 'ok' and 'torch.nn.modules.batchnorm.SyncBatchNorm' in json.dumps(res)


def test_registries_gain_only_our_names_and_global_state_is_unchanged(reports):
    """mmengine's MODELS and HOOKS (with mmcv's layers) hold the same entries plus ours; none of
    our names is taken in them or in mmdet's registries once all of mmdet is registered (so
    ``force=True`` replaces nothing); warnings filters, loggers, torch flags, environment: as
    without the plugin."""
    none, plugin = reports['none']['registries'], reports['plugin']['registries']
    for reg, ours in OUR_NAMES.items():
        found = {k for k, v in plugin[reg].items() if v.startswith('cbn_mmdet.')}
        assert found <= ours and {'CBN', 'CBNHook'} & found, (reg, found)
        assert {k: v for k, v in plugin[reg].items() if k not in ours} == none[reg], reg
    for reg, entries in none['with mmdet'].items():
        taken = set(entries) & set().union(*OUR_NAMES.values())
        assert not taken, f'{reg} already has {sorted(taken)}'
    got, want = reports['plugin']['global'], reports['none']['global']
    assert got == want, '\n'.join(_differences(got, want))
