"""Study 5's configs differ from the real configs they inherit only where the miniature says."""
import glob
import os.path as osp
import re

import pytest
from mmengine.config import Config

from tests.helpers import ROOT

STUDY = sorted(glob.glob(osp.join(ROOT, 'configs/studies/paper_table/*.py')))
REAL = {'none': '4conv1fc', 'bn': 'bn', 'syncbn': 'syncbn', 'gn': 'gn', 'cbn': 'cbn', 'synccbn': 'cbn'}
# What the miniature may change (configs/_base_/paper_table_miniature.py): data, backbone size
# and weights, the widths that follow, proposals for 128-px images, schedule length.
ALLOWED = re.compile(r'^(miniature\..*|_.*|model\.backbone\.(depth|base_channels|init_cfg\.checkpoint)'
                     r'|model\.neck\.(in_channels|out_channels)'
                     r'|model\.rpn_head\.(in_channels|feat_channels|anchor_generator\.scales)'
                     r'|model\.roi_head\.(bbox|mask)_roi_extractor\.out_channels'
                     r'|model\.roi_head\.(bbox|mask)_head\.(in_channels|conv_out_channels|fc_out_channels|num_classes)'
                     r'|model\.(train|test)_cfg\.(rpn_proposal|rpn|rcnn)\.(nms_pre|max_per_img|sampler\.num)'
                     r'|(train|val|test)_dataloader\.(num_workers|persistent_workers|dataset\..*)'
                     r'|val_dataloader\.batch_size|test_dataloader\.batch_size'
                     r'|(val|test)_evaluator\..*|train_cfg\.(max_epochs|val_interval)'
                     r'|param_scheduler|default_hooks\.(logger\.interval|checkpoint\.interval))$')


def flat(d, prefix=''):
    out = {}
    for k, v in d.items():
        key = f'{prefix}{k}'
        if isinstance(v, dict):
            out.update(flat(v, key + '.'))
        else:
            out[key] = v
    return out


def test_the_study_has_every_cell():
    names = {osp.basename(p) for p in STUDY}
    cells = [(4, a) for a in REAL] + [(b, a) for b in (2, 1) for a in ('none', 'bn', 'syncbn', 'gn', 'cbn')]
    assert names == {f'mask-rcnn_r18-w32-digits_fpn_{a}_4xb{b}-12e_digits.py' for b, a in cells}


@pytest.mark.parametrize('path', STUDY, ids=osp.basename)
def test_study_config_changes_only_what_the_miniature_changes(path):
    arm, batch = re.search(r'_fpn_(\w+?)_4xb(\d)', osp.basename(path)).groups()
    real_path = osp.join(ROOT, f'configs/cbn/mask-rcnn_r50_fpn_{REAL[arm]}_4xb{batch}-1x_coco.py')
    study, real = flat(Config.fromfile(path).to_dict()), flat(Config.fromfile(real_path).to_dict())
    differ = sorted(k for k in set(study) | set(real) if study.get(k, '<missing>') != real.get(k, '<missing>'))
    norm_keys = {f'model.{m}.norm_cfg.{f}' for m in ('neck', 'roi_head.bbox_head', 'roi_head.mask_head')
                 for f in ('type', 'window')}
    unexpected = [k for k in differ if not ALLOWED.match(k) and k not in norm_keys]
    assert not unexpected, unexpected
    # the norm under test is the real config's, except where torch's SyncBatchNorm cannot run
    types = {study[k] for k in norm_keys if k.endswith('type') and k in study}
    expected = {'none': set(), 'bn': {'BN'}, 'gn': {'GN'}, 'cbn': {'CBN'}, 'syncbn': {'SyncCBN'},
                'synccbn': {'SyncCBN'}}[arm]
    assert types == expected
    windows = {study[k] for k in norm_keys if k.endswith('window') and k in study}
    assert windows == ({1} if arm == 'syncbn' else {16 // int(batch)} if 'cbn' in arm else set())
    # what the paper setting fixes stays: frozen BN backbone, lr, clipping, burn-in, 1x shape
    for k in ('model.backbone.norm_eval', 'model.backbone.frozen_stages', 'model.backbone.norm_cfg.type',
              'model.backbone.norm_cfg.requires_grad', 'optim_wrapper.optimizer.lr',
              'optim_wrapper.clip_grad.max_norm', 'train_dataloader.batch_size'):
        assert study[k] == real[k], k
    assert study['model.backbone.norm_eval'] is True  # BN statistics frozen (mmdet's default)
    warmup, steps = study['param_scheduler']
    assert steps['milestones'] == [8, 11] and study['train_cfg.max_epochs'] == 12
    assert warmup['end'] == 1 and warmup['by_epoch'] and warmup['convert_to_iter_based']
    assert study['model.backbone.init_cfg.checkpoint'] == 'data/pretrained/resnet18-w32_digits.pth'
    assert study.get('custom_hooks') == real.get('custom_hooks')
