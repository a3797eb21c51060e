"""End to end through the repo's tools: train, save, resume, evaluate the saved checkpoint."""
import ast
import os.path as osp

import pytest
import torch

from tests.helpers import QUICKSTART, TORCH_LOAD_IS_SAFE, digits_options, make_tiny_digits, run_tool

pytestmark = pytest.mark.integration


@pytest.fixture(scope='module')
def tiny_data(tmp_path_factory):
    return make_tiny_digits(str(tmp_path_factory.mktemp('digits')))


def test_train_resume_and_test_checkpoint(tiny_data, tmp_path):
    work = str(tmp_path / 'work')
    opts = digits_options(tiny_data) + ['custom_hooks.0.burnin_epochs=0',
                                        'default_hooks.checkpoint.interval=1',
                                        'train_cfg.val_interval=10']
    run_tool(['tools/train.py', QUICKSTART, '--work-dir', work, '--cfg-options',
              'train_cfg.max_epochs=1'] + opts)
    ckpt1 = osp.join(work, 'epoch_1.pth')
    assert osp.isfile(ckpt1)
    # The checkpoint holds the CBN windows and loads with torch's safe loading (weights_only).
    from cbn_mmdet.engine.checkpoint import load_local_checkpoint
    state = load_local_checkpoint(ckpt1)['state_dict']
    assert state['neck.fpn_convs.0.bn.cbn_dnu'].dim() == 4
    assert state['neck.fpn_convs.0.bn.cbn_step'].item() == 4  # 16 images / batch 4
    if TORCH_LOAD_IS_SAFE:  # torch >= 2.6 (torch.load's default was unsafe before)
        with pytest.raises(Exception):  # what mmengine alone would do under torch >= 2.6
            torch.load(ckpt1)

    out = run_tool(['tools/train.py', QUICKSTART, '--work-dir', work, '--resume',
                    '--cfg-options', 'train_cfg.max_epochs=2'] + opts)
    assert 'resumed epoch: 1, iter: 4' in out
    assert osp.isfile(osp.join(work, 'epoch_2.pth'))
    resumed = load_local_checkpoint(osp.join(work, 'epoch_2.pth'))['state_dict']
    assert resumed['neck.fpn_convs.0.bn.cbn_step'].item() == 8

    out = run_tool(['tools/test.py', QUICKSTART, osp.join(work, 'epoch_2.pth'),
                    '--work-dir', str(tmp_path / 'test'), '--cfg-options'] + opts)
    metrics = ast.literal_eval(out.strip().splitlines()[-1])
    for key in ('coco/bbox_mAP', 'coco/segm_mAP'):
        assert 0.0 <= metrics[key] <= 1.0


def test_load_from_a_saved_checkpoint(tiny_data, tmp_path):
    work = str(tmp_path / 'work')
    opts = digits_options(tiny_data) + ['train_cfg.val_interval=10']
    run_tool(['tools/train.py', QUICKSTART, '--work-dir', work, '--cfg-options',
              'train_cfg.max_epochs=1'] + opts)
    out = run_tool(['tools/train.py', QUICKSTART, '--work-dir', str(tmp_path / 'ft'),
                    '--cfg-options', 'train_cfg.max_epochs=1',
                    f'load_from={osp.join(work, "epoch_1.pth")}'] + opts)
    assert 'Load checkpoint from' in out
