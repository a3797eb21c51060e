"""Every config builds offline; paper configs train end to end on the digits data."""
import glob
import os.path as osp
import re

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import init_default_scope

import cbn_mmdet  # noqa: F401
from cbn_mmdet.cbn import CrossIterationBatchNorm2d
from tests.helpers import ROOT, digits_config, make_tiny_digits, run_tool

CONFIGS = sorted(osp.relpath(p, ROOT) for p in glob.glob(osp.join(ROOT, 'configs', '**', '*.py'),
                                                          recursive=True)
                 if '_base_' not in p)
PAPER = [c for c in CONFIGS if c.startswith('configs/cbn/')]
NORM_TYPES = {'cbn': CrossIterationBatchNorm2d, 'syncbn': torch.nn.SyncBatchNorm,
              'gn': torch.nn.GroupNorm, 'bn': torch.nn.BatchNorm2d}


def test_config_set_is_complete():
    names = {osp.basename(c) for c in PAPER}
    for det in ('faster-rcnn', 'mask-rcnn'):
        assert f'{det}_r50_fpn_4conv1fc_4xb4-1x_coco.py' in names
        for norm in ('cbn', 'syncbn', 'gn'):
            assert f'{det}_r50_fpn_{norm}_4xb4-1x_coco.py' in names
        for norm in ('cbn', 'syncbn', 'gn', 'bn', 'cbn-all', '4conv1fc'):
            for b in (2, 1):
                assert f'{det}_r50_fpn_{norm}_4xb{b}-1x_coco.py' in names


@pytest.mark.parametrize('config', CONFIGS)
def test_config_loads_and_builds_without_network(config):
    from mmdet.registry import MODELS
    cfg = Config.fromfile(osp.join(ROOT, config))
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    model = MODELS.build(cfg.model)  # building never downloads (weights load in init_weights)
    name = osp.basename(config)
    if config in PAPER:
        assert type(model.roi_head.bbox_head).__name__ == 'Shared4Conv1FCBBoxHead'
        m = re.search(r'_fpn_(.+?)_4xb(\d)', name)
        norm, per_gpu = m.group(1), int(m.group(2))
        precise = norm.endswith('-precise')  # the same config plus PreciseStatsHook
        norm = norm[:-len('-precise')] if precise else norm
        hooks = [h['type'] for h in cfg.get('custom_hooks', [])]
        assert hooks.count('PreciseStatsHook') == int(precise)
        if precise:
            base = Config.fromfile(osp.join(ROOT, config.replace('cbn-precise', 'cbn')))
            this = Config.fromfile(osp.join(ROOT, config))  # cfg.model was consumed by build
            assert this.model == base.model and this.param_scheduler == base.param_scheduler
        assert cfg.train_dataloader.batch_size == per_gpu
        assert cfg.optim_wrapper.optimizer.lr == pytest.approx(0.02 * 4 * per_gpu / 16)
        assert cfg.model.backbone.norm_eval is (norm != 'cbn-all')
        neck_norms = [type(x) for x in model.neck.modules()
                      if isinstance(x, (torch.nn.modules.batchnorm._BatchNorm, torch.nn.GroupNorm))]
        if norm == '4conv1fc':
            assert not neck_norms
        else:
            expected = NORM_TYPES[norm.replace('-all', '')]
            assert neck_norms and all(issubclass(t, expected) for t in neck_norms)
            head = [x for x in model.roi_head.modules() if isinstance(x, expected)]
            assert len(head) == 4 + (4 if name.startswith('mask') else 0)
        backbone_cbn = any(isinstance(x, CrossIterationBatchNorm2d) for x in model.backbone.modules())
        assert backbone_cbn is (norm == 'cbn-all')
        if norm.startswith('cbn'):
            hook = [h for h in cfg.custom_hooks if h['type'] == 'CBNHook']
            assert len(hook) == 1 and hook[0]['burnin_epochs'] == 'first_lr_step'
            by_module = hook[0].get('burnin_epochs_by_module')
            assert by_module == (dict(backbone=0.05) if norm == 'cbn-all' and per_gpu < 4 else None)
            assert 'cbn_mmdet' in cfg.custom_imports.imports
            # about 16 images pooled per window: window 4 / 8 / 16 at 4 / 2 / 1 images per GPU
            windows = {x.window for x in model.modules() if isinstance(x, CrossIterationBatchNorm2d)}
            assert windows == {16 // per_gpu}


@pytest.mark.parametrize('config', CONFIGS)
def test_lr_bookkeeping_and_optimization_recipe(config):
    """auto_scale_lr's base_batch_size is the total batch (GPUs x images, from the name) that
    the config's lr is set for, so --auto-scale-lr keeps the lr on the intended setup; the paper
    configs use the release's recipe: clipping at L2 norm 35, warmup from lr/3 over 500 iterations."""
    cfg = Config.fromfile(osp.join(ROOT, config))
    gpus, per_gpu = map(int, re.search(r'_(\d+)xb(\d+)', osp.basename(config)).groups())
    assert cfg.train_dataloader.batch_size == per_gpu
    assert cfg.auto_scale_lr.base_batch_size == gpus * per_gpu
    if config in PAPER:
        assert cfg.optim_wrapper.optimizer.lr == pytest.approx(0.02 * gpus * per_gpu / 16)
        assert cfg.optim_wrapper.clip_grad == dict(max_norm=35, norm_type=2)
        warmup, steps = cfg.param_scheduler
        assert warmup == dict(type='LinearLR', start_factor=pytest.approx(1 / 3), by_epoch=False,
                              begin=0, end=500)
        assert steps['type'] == 'MultiStepLR' and steps['milestones'] == [8, 11]
        assert cfg.train_cfg.max_epochs == 12


@pytest.fixture(scope='module')
def tiny_data(tmp_path_factory):
    return make_tiny_digits(str(tmp_path_factory.mktemp('digits')), num_train=8, num_val=4)


@pytest.mark.integration
@pytest.mark.parametrize('config,with_mask', [
    ('configs/cbn/faster-rcnn_r50_fpn_cbn_4xb4-1x_coco.py', False),
    ('configs/cbn/mask-rcnn_r50_fpn_cbn_4xb4-1x_coco.py', True),
])
def test_paper_config_trains_two_iterations_on_digits(config, with_mask, tiny_data, tmp_path):
    cfg_path = digits_config(config, tiny_data, str(tmp_path / 'cfg.py'), with_mask,
                             batch_size=4, extra={'custom_hooks': [
                                 dict(type='CBNHook', burnin_epochs=0.5)]})
    out = run_tool(['tools/train.py', cfg_path, '--work-dir', str(tmp_path / 'work')])
    assert 'Epoch(train) [1][2/2]' in out
    assert 'burn-in 0.5 epochs = 1 iterations' in out
    assert osp.isfile(tmp_path / 'work' / 'epoch_1.pth')
