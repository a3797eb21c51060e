"""tools/model_converters/cbn_to_bn.py: a trained CBN detector as a stock MMDetection BN one.

The integration tests share one tiny trained checkpoint (a few real CBN training steps past
burn-in through tools/train.py, with EMAHook) and its conversion; the stock check runs in a
process where cbn_mmdet cannot be imported (tests/tools/stock_mmdet_check.py)."""
import json
import os.path as osp
import pickle
import sys

import numpy as np
import pytest
import torch

from tests.helpers import QUICKSTART, ROOT, make_tiny_digits, run_tool
from tests.multiproc import run
from tests.tools.stock_mmdet_check import eval_outputs, fixed_inputs
from tools.model_converters.cbn_to_bn import main as convert_main
from tools import test as test_tool

CBN_TYPES = ('CBN', 'SyncCBN', 'CrossIterationBatchNorm2d', 'SyncCrossIterationBatchNorm2d')


# ---------------------------------------------------------------- config tree, no model
def test_config_tree_is_converted_wherever_it_is():
    from cbn_mmdet.deploy import convert_config_dict
    cbn = dict(type='CBN', window=4, burnin=10, compensate=False, eps=1e-3, momentum=0.03,
               requires_grad=False)
    cfg = dict(
        custom_imports=dict(imports=['cbn_mmdet', 'cbn_mmdet.engine', 'mmdet.models'],
                            allow_failed_imports=False),
        cbn=cbn,
        model=dict(type='MaskRCNN', neck=dict(type='FPN', norm_cfg=cbn),
                   roi_head=dict(bbox_head=[dict(type='Shared4Conv1FCBBoxHead',
                                                 norm_cfg=dict(type='SyncCBN', window=2,
                                                               process_group=None))],
                                 mask_head=dict(norm_cfg=dict(type='CrossIterationBatchNorm2d')),
                                 extra=(dict(plugins=[dict(norm=dict(type='mmdet.CBN'))]),)),
                   backbone=dict(norm_cfg=dict(type='BN', requires_grad=True))),
        custom_hooks=[dict(type='CBNHook', burnin_epochs='first_lr_step'),
                      dict(type='EMAHook', momentum=0.5),
                      dict(type='PreciseStatsHook', num_images=10),
                      dict(type='SeedPerIterationHook', seed=1),
                      dict(type='CBNStatsProbeHook', interval=5)],
        default_hooks=dict(logger=dict(type='LoggerHook'), seed=dict(type='SeedPerIterationHook')),
        test_dataloader=dict(dataset=dict(type='CocoDataset', metainfo=dict(classes=('0', '1')))),
    )
    out, changes = convert_config_dict(cfg)
    bn = dict(type='BN', eps=1e-3, momentum=0.03, requires_grad=False)
    assert out['cbn'] == bn and out['model']['neck']['norm_cfg'] == bn
    assert out['model']['roi_head']['bbox_head'][0]['norm_cfg'] == dict(type='BN')  # SyncCBN -> BN
    assert out['model']['roi_head']['mask_head']['norm_cfg'] == dict(type='BN')
    assert out['model']['roi_head']['extra'] == (dict(plugins=[dict(norm=dict(type='BN'))]),)
    assert out['model']['backbone'] == cfg['model']['backbone']
    assert out['custom_hooks'] == [dict(type='EMAHook', momentum=0.5)]
    assert out['default_hooks'] == dict(logger=dict(type='LoggerHook'))
    assert out['custom_imports'] == dict(imports=['mmdet.models'], allow_failed_imports=False)
    assert out['test_dataloader'] == cfg['test_dataloader']
    assert cfg['cbn']['window'] == 4  # the input is left as it was
    assert any('model.neck.norm_cfg' in c and 'burnin, compensate, window' in c for c in changes)
    assert sum('dropped hook' in c for c in changes) == 5

    sync, _ = convert_config_dict(cfg, sync_cbn_as='SyncBN')
    assert sync['model']['roi_head']['bbox_head'][0]['norm_cfg'] == dict(type='SyncBN',
                                                                         process_group=None)
    assert sync['model']['neck']['norm_cfg'] == bn
    only_ours, _ = convert_config_dict(dict(custom_imports=dict(imports='cbn_mmdet')))
    assert 'custom_imports' not in only_ours


def test_a_type_of_ours_without_stock_equivalent_is_an_error():
    from mmengine.registry import TRANSFORMS

    from cbn_mmdet.deploy import ConversionError, convert_config_dict
    cls = type('DigitsOnlyTransform', (), {'__module__': 'cbn_mmdet.datasets.fake'})
    TRANSFORMS.register_module(module=cls)
    try:
        cfg = dict(train_dataloader=dict(dataset=dict(pipeline=[
            dict(type='LoadImageFromFile'), dict(type='DigitsOnlyTransform')])))
        with pytest.raises(ConversionError, match=r"my\.py: train_dataloader\.dataset\.pipeline"
                           r"\[1\] has type 'DigitsOnlyTransform', which is cbn_mmdet's"):
            convert_config_dict(cfg, where='my.py')
    finally:
        TRANSFORMS.module_dict.pop('DigitsOnlyTransform')


def test_state_dict_loses_cbn_keys_of_cbn_layers_only():
    from collections import OrderedDict

    from cbn_mmdet.deploy import strip_cbn_state
    t = torch.zeros(1)
    sd = OrderedDict([('neck.bn.weight', t), ('neck.bn.num_batches_tracked', t),
                      ('neck.bn.cbn_step', t), ('neck.bn.cbn_skipped', t), ('neck.bn.cbn_mu', t),
                      ('neck.bn.cbn_head', t), ('head.cbn_scale', t)])
    sd._metadata = OrderedDict([('neck.bn', {'version': 3}), ('head', {'version': 1})])
    out, removed = strip_cbn_state(sd, ['neck.bn'])
    assert list(out) == ['neck.bn.weight', 'neck.bn.num_batches_tracked', 'head.cbn_scale']
    assert removed == ['neck.bn.cbn_step', 'neck.bn.cbn_skipped', 'neck.bn.cbn_mu', 'neck.bn.cbn_head']
    assert out._metadata == {'neck.bn': {'version': 2}, 'head': {'version': 1}}
    assert sd._metadata['neck.bn'] == {'version': 3}


def test_checkpoint_entries_kept_converted_and_dropped():
    from collections import OrderedDict

    from cbn_mmdet.deploy import ConversionError, convert_checkpoint
    t = torch.ones(2)
    sd = OrderedDict([('bn.weight', t), ('bn.running_mean', t), ('bn.num_batches_tracked', t),
                      ('bn.cbn_step', t), ('bn.cbn_skipped', t), ('conv.weight', t)])
    ema = OrderedDict([('steps', t)] + [('module.' + k, v) for k, v in sd.items()])
    ckpt = dict(meta=dict(cfg='old', epoch=np.int64(3), palette=np.zeros(2, np.uint8)),
                state_dict=sd, ema_state_dict=ema, cbn_window={'bn': {}}, optimizer={},
                message_hub={}, param_schedulers=[], extra=1)
    out, report = convert_checkpoint(ckpt, ['bn'], 'new', 'x.pth', dict(tool='t'))
    assert sorted(out) == ['ema_state_dict', 'meta', 'state_dict']
    assert report['dropped'] == ['cbn_window', 'extra', 'message_hub', 'optimizer', 'param_schedulers']
    assert out['meta'] == dict(cfg='new', epoch=3, palette=[0, 0], converted_from=dict(tool='t'))
    assert type(out['meta']['epoch']) is int
    assert list(out['state_dict']) == ['bn.weight', 'bn.running_mean', 'bn.num_batches_tracked',
                                       'conv.weight']
    assert list(out['ema_state_dict']) == ['steps'] + ['module.' + k for k in out['state_dict']]
    assert report['ema_state_dict'] == ['module.bn.cbn_step', 'module.bn.cbn_skipped']
    bare, report = convert_checkpoint(sd, ['bn'], 'new', 'x.pth')
    assert bare['meta'] == dict(cfg='new') and report['dropped'] == []
    ema.pop('module.conv.weight')
    with pytest.raises(ConversionError, match=r"x\.pth: checkpoint\['ema_state_dict'\] does not "
                       r"hold the model of checkpoint\['state_dict'\] under 'module\.' "
                       r"\(1 keys in one only, e\.g\. \['conv\.weight'\]\)"):
        convert_checkpoint(ckpt, ['bn'], 'new', 'x.pth')


# ---------------------------------------------------------------- a trained tiny CBN detector
TRAIN_CONFIG = """_base_ = [{base!r}]
data_root = {root!r}
train_dataloader = dict(batch_size=2, num_workers=0, persistent_workers=False,
                        dataset=dict(data_root=data_root))
val_dataloader = dict(batch_size=2, num_workers=0, persistent_workers=False,
                      dataset=dict(data_root=data_root))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val.json')
test_evaluator = val_evaluator
train_cfg = dict(max_epochs=1, val_interval=10)
# burn-in of 1 of the 3 iterations: then the window is used, compensated
custom_hooks = [dict(type='CBNHook', burnin_epochs=1 / 3),
                dict(type='EMAHook', momentum=0.5, priority=49),
                dict(type='SeedPerIterationHook', seed=0)]
default_hooks = dict(logger=dict(interval=1), checkpoint=dict(interval=1))
randomness = dict(seed=0)
"""


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """(config, checkpoint) of a Mask R-CNN with 16 CBN layers after 3 training iterations
    (6 images, 2 per iteration; no validation)."""
    tmp = tmp_path_factory.mktemp('cbn_to_bn')
    root = make_tiny_digits(str(tmp / 'digits'), num_train=6, num_val=4).rstrip('/') + '/'
    config = tmp / 'mask-rcnn_cbn_tiny.py'
    config.write_text(TRAIN_CONFIG.format(base=osp.join(ROOT, QUICKSTART), root=root))
    work = tmp / 'work'
    run_tool(['tools/train.py', str(config), '--work-dir', str(work), '--cfg-options',
              'val_cfg=None', 'val_dataloader=None', 'val_evaluator=None'])
    return str(config), str(work / 'epoch_1.pth')


@pytest.fixture(scope='module')
def converted(trained, tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp('bn'))
    res = convert_main([trained[0], trained[1], out_dir])
    return res


def _load(path):
    from cbn_mmdet.engine.checkpoint import load_local_checkpoint
    return load_local_checkpoint(path, map_location='cpu')


@pytest.mark.integration
def test_converted_files(trained, converted):
    from mmengine.config import Config
    src = _load(trained[1])
    assert src['cbn_window'] and any(k.endswith('.cbn_step') for k in src['state_dict'])
    assert src['state_dict']['neck.fpn_convs.0.bn.cbn_step'].item() == 3
    # iterations 2 and 3 are in the window (the 3rd normalized with the 2nd, compensated)
    assert src['cbn_window']['neck.fpn_convs.0.bn']['cbn_valid'].sum().item() == 2
    assert len(converted.cbn_layers) == 16
    assert osp.basename(converted.config) == osp.basename(trained[0])
    assert osp.basename(converted.checkpoint) == osp.basename(trained[1])

    text = open(converted.config).read()
    assert 'cbn_mmdet' not in text and '_base_' not in text
    for name in CBN_TYPES + ('CBNHook', 'SeedPerIterationHook', 'window', 'burnin'):
        assert repr(name) not in text and f'{name}=' not in text, name
    cfg = Config.fromfile(converted.config)
    assert 'custom_imports' not in cfg
    assert [h['type'] for h in cfg.custom_hooks] == ['EMAHook']
    assert cfg.model.neck.norm_cfg == dict(type='BN', requires_grad=True)
    assert cfg.model.roi_head.mask_head.norm_cfg == dict(type='BN', requires_grad=True)
    assert cfg.test_dataloader.dataset.type == 'CocoDataset'
    assert cfg.test_dataloader.dataset.metainfo == dict(classes=tuple('0123456789'))

    ckpt = torch.load(converted.checkpoint, map_location='cpu', weights_only=True)
    assert sorted(ckpt) == ['ema_state_dict', 'meta', 'state_dict']
    assert sorted(converted.dropped) == ['cbn_window', 'message_hub', 'optimizer', 'param_schedulers']
    assert ckpt['meta']['cfg'] == text == cfg.pretty_text
    assert ckpt['meta']['dataset_meta']['classes'] == tuple('0123456789')
    assert ckpt['meta']['converted_from']['checkpoint'] == 'epoch_1.pth'
    for key in ('state_dict', 'ema_state_dict'):
        new, old = ckpt[key], src[key]
        assert not [k for k in new if '.cbn_' in k or k.startswith('cbn_')]
        assert sorted(new) == sorted(k for k in old if '.cbn_' not in k)
        assert all(torch.equal(new[k], old[k]) for k in new)
        assert len(converted.removed_keys[key]) == 2 * 16  # cbn_step and cbn_skipped per layer
    bn = 'neck.fpn_convs.0.bn'
    assert ckpt['state_dict'][f'{bn}.num_batches_tracked'].item() == 3
    assert ckpt['state_dict']._metadata[bn]['version'] == torch.nn.BatchNorm2d._version
    assert ckpt['ema_state_dict']['steps'].item() == 3


@pytest.mark.integration
def test_stock_mmdet_builds_loads_and_evaluates_like_the_cbn_model(trained, converted, tmp_path):
    """In a process where cbn_mmdet cannot be imported: mmdet builds the converted config,
    loads the checkpoint strictly, gives the CBN model's eval outputs and its test metrics."""
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    from mmengine.config import Config
    from mmengine.runner import load_checkpoint

    from cbn_mmdet import CrossIterationBatchNorm2d
    register_all_modules()
    cbn_model = MODELS.build(Config.fromfile(trained[0]).model)
    load_checkpoint(cbn_model, trained[1], map_location='cpu', strict=True)
    assert sum(isinstance(m, CrossIterationBatchNorm2d) for m in cbn_model.modules()) == 16
    images, meta = fixed_inputs()
    torch.save((images, meta), tmp_path / 'inputs.pt')
    want = eval_outputs(cbn_model, images, meta)

    stock = tmp_path / 'stock'
    stock.mkdir()
    rc, out = run([sys.executable, '-I', osp.join(ROOT, 'tests/tools/stock_mmdet_check.py'),
                   converted.config, converted.checkpoint, str(tmp_path / 'inputs.pt'),
                   str(tmp_path / 'outputs.pt'), str(stock)], cwd=str(stock), deadline=600,
                  what='stock mmdet check')
    assert rc == 0, out[-6000:]
    report = json.loads(out.strip().splitlines()[-1][len('RESULT '):])
    # the blocker acted: cbn_mmdet was importable in this interpreter, and was not imported
    assert report['findable_before_blocking'] is True
    assert report['import_cbn_mmdet'].startswith('ImportError: cbn_mmdet is blocked')
    assert report['blocked_attempts'][0] == 'cbn_mmdet' and report['cbn_mmdet_modules'] == []
    assert report['strict_load'] == dict(missing=[], unexpected=[])
    assert report['norm_layers'] == ['BatchNorm2d']
    assert report['inferencer_same_outputs'] is True  # DetInferencer(weights=...) via meta['cfg']

    got = torch.load(tmp_path / 'outputs.pt')
    assert sorted(got) == sorted(want) and len(want) == 5 + 3
    assert all(got[k].shape == want[k].shape for k in want)
    diffs = {k: (got[k] - want[k]).abs().max().item() for k in want}
    print('max abs difference, stock BN vs CBN model:', diffs)
    assert max(diffs.values()) <= 1e-6, diffs

    # evaluation: stock Runner.test vs tools/test.py on the CBN config and checkpoint (its
    # main() in this process: the same runner as the command, without another interpreter)
    cbn_pred = str(tmp_path / 'cbn_predictions.pkl')
    cbn_metrics = test_tool.main([trained[0], trained[1], '--work-dir', str(tmp_path / 'cbn'),
                             '--out', cbn_pred])
    assert report['metrics'] == {k: float(v) for k, v in cbn_metrics.items()}
    assert 'coco/bbox_mAP' in cbn_metrics and 'coco/segm_mAP' in cbn_metrics
    with open(cbn_pred, 'rb') as f:
        a = pickle.load(f)
    with open(stock / 'predictions.pkl', 'rb') as f:
        b = pickle.load(f)
    assert len(a) == len(b) == 4
    boxes = 0
    for x, y in zip(a, b):
        px, py = x['pred_instances'], y['pred_instances']
        assert x['img_id'] == y['img_id']
        assert torch.equal(torch.as_tensor(px['labels']), torch.as_tensor(py['labels']))
        for key in ('bboxes', 'scores'):
            assert np.allclose(np.asarray(px[key]), np.asarray(py[key]), rtol=0, atol=1e-5), key
        boxes += len(px['labels'])
    assert boxes > 0  # not a comparison of empty results


# ---------------------------------------------------------------- errors
def _inherit(tmp_path, name, base, body):
    path = tmp_path / name
    path.write_text(f'_base_ = [{base!r}]\n{body}')
    return str(path)


@pytest.mark.integration
def test_a_checkpoint_that_is_not_a_cbn_models_is_refused(trained, converted, tmp_path, capsys):
    from cbn_mmdet.deploy import ConversionError, cbn_to_bn
    # the BN model's own files: nothing to convert
    with pytest.raises(ConversionError, match=r"epoch_1\.pth: not a CBN model's checkpoint - "
                       r'its state_dict holds no CBN state .* builds no CBN layer either'):
        cbn_to_bn(converted.config, converted.checkpoint, str(tmp_path / 'a'))
    # a BN checkpoint with the CBN config (which would load it: CBN loads BN state_dicts)
    with pytest.raises(ConversionError, match=r"not a CBN model's checkpoint .* although "
                       r'.*mask-rcnn_cbn_tiny\.py builds 16 CBN layers'):
        cbn_to_bn(trained[0], converted.checkpoint, str(tmp_path / 'b'))
    # the CBN checkpoint with the BN config
    with pytest.raises(ConversionError, match=r'does not match .*epoch_1\.pth: the config builds '
                       r'no CBN layer, the checkpoint holds CBN state for 16 layers'):
        cbn_to_bn(converted.config, trained[1], str(tmp_path / 'c'))
    # through the command line: exit status 1 and the message, nothing written
    with pytest.raises(SystemExit) as e:
        convert_main([converted.config, converted.checkpoint, str(tmp_path / 'd')])
    assert e.value.code == 1
    assert "cbn_to_bn: error: " in capsys.readouterr().err
    assert not (tmp_path / 'a').exists() and not (tmp_path / 'd').exists()


@pytest.mark.integration
def test_a_config_that_does_not_match_the_checkpoint_is_refused(trained, tmp_path):
    from cbn_mmdet.deploy import ConversionError, cbn_to_bn
    fewer = _inherit(tmp_path, 'two_mask_convs.py', trained[0],
                     'model = dict(roi_head=dict(mask_head=dict(num_convs=2)))\n')
    with pytest.raises(ConversionError, match=r'two_mask_convs\.py does not match .*epoch_1\.pth: '
                       r'\d+ keys of the checkpoint are not in the model '
                       r'\(roi_head\.mask_head\.convs\.2\.'):
        cbn_to_bn(fewer, trained[1], str(tmp_path / 'a'))
    wider = _inherit(tmp_path, 'wide_fc.py', trained[0],
                     'model = dict(roi_head=dict(bbox_head=dict(fc_out_channels=128)))\n')
    with pytest.raises(ConversionError, match=r'wide_fc\.py does not match .*epoch_1\.pth: \d+ '
                       r'tensors have another shape in the model .*roi_head\.bbox_head\.shared_fcs'):
        cbn_to_bn(wider, trained[1], str(tmp_path / 'b'))
    with pytest.raises(ConversionError, match=r'nothing\.pth: no such checkpoint file'):
        cbn_to_bn(trained[0], str(tmp_path / 'nothing.pth'), str(tmp_path / 'c'))
    assert not (tmp_path / 'a').exists() and not (tmp_path / 'b').exists()
