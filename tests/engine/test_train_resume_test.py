"""End to end through the repo's tools: train, save, resume, evaluate the saved checkpoint
(and paint its predictions with --show-dir)."""
import ast
import os
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
    # CBNHook writes the windows beside the state_dict (which holds BN's buffers and the two
    # counters); the checkpoint loads with torch's safe loading (weights_only).
    from cbn_mmdet.engine.checkpoint import load_local_checkpoint
    ckpt = load_local_checkpoint(ckpt1)
    state = ckpt['state_dict']
    assert ckpt['cbn_window']['neck.fpn_convs.0.bn']['cbn_dnu'].dim() == 4
    assert not [k for k in state if '.cbn_' in k and not k.endswith(('.cbn_step', '.cbn_skipped'))]
    assert state['neck.fpn_convs.0.bn.cbn_step'].item() == 4  # 16 images / batch 4
    if TORCH_LOAD_IS_SAFE:  # torch >= 2.6 (torch.load's default was unsafe before)
        with pytest.raises(Exception):  # what mmengine alone would do under torch >= 2.6
            torch.load(ckpt1)

    out = run_tool(['tools/train.py', QUICKSTART, '--work-dir', work, '--resume',
                    '--cfg-options', 'train_cfg.max_epochs=2'] + opts)
    assert 'resumed epoch: 1, iter: 4' in out
    assert 'resumed at step 4 with the saved windows of' in out
    assert osp.isfile(osp.join(work, 'epoch_2.pth'))
    resumed = load_local_checkpoint(osp.join(work, 'epoch_2.pth'))['state_dict']
    assert resumed['neck.fpn_convs.0.bn.cbn_step'].item() == 8

    painted = tmp_path / 'painted'
    out = run_tool(['tools/test.py', QUICKSTART, osp.join(work, 'epoch_2.pth'),
                    '--work-dir', str(tmp_path / 'test'), '--show-dir', str(painted),
                    '--cfg-options'] + opts)
    metrics = ast.literal_eval(out.strip().splitlines()[-1])
    for key in ('coco/bbox_mAP', 'coco/segm_mAP'):
        assert 0.0 <= metrics[key] <= 1.0
    # --show-dir: mmdet's DetVisualizationHook paints every test image, ground truth beside
    # the prediction (twice the 128-pixel width)
    val_images = sorted(os.listdir(osp.join(tiny_data, 'val')))
    assert val_images and sorted(os.listdir(painted)) == val_images
    from PIL import Image
    for name in val_images:
        with Image.open(painted / name) as img:
            assert img.size == (256, 128), (name, img.size)


def test_load_from_a_saved_checkpoint(tiny_data, tmp_path):
    work = str(tmp_path / 'work')
    opts = digits_options(tiny_data) + ['train_cfg.val_interval=10']
    run_tool(['tools/train.py', QUICKSTART, '--work-dir', work, '--cfg-options',
              'train_cfg.max_epochs=1'] + opts)
    out = run_tool(['tools/train.py', QUICKSTART, '--work-dir', str(tmp_path / 'ft'),
                    '--cfg-options', 'train_cfg.max_epochs=1',
                    f'load_from={osp.join(work, "epoch_1.pth")}'] + opts)
    assert 'Load checkpoint from' in out
    assert 'for a new run (load_from): every CBN layer starts with an empty window at step 0' in out
    from cbn_mmdet.engine.checkpoint import load_local_checkpoint
    state = load_local_checkpoint(osp.join(tmp_path, 'ft', 'epoch_1.pth'))['state_dict']
    assert state['neck.fpn_convs.0.bn.cbn_step'].item() == 4  # this run's 4 steps, not 8


def _inherit(tmp_path, name, body):
    path = tmp_path / name
    path.write_text(f"_base_ = [{osp.join(osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))), QUICKSTART)!r}]\n" + body)
    return str(path)


def test_resume_without_saved_windows_refills_them(tiny_data, tmp_path):
    """CBNHook(save_window=False): checkpoints hold no window (the size of a BN model's plus
    two counters per layer); --resume says the windows refill, and training goes on."""
    cfg = _inherit(tmp_path, 'nowin.py', "custom_hooks = [dict(type='CBNHook', burnin_epochs=0, "
                   'save_window=False)]\n')
    work = str(tmp_path / 'work')
    opts = digits_options(tiny_data) + ['train_cfg.val_interval=10']
    run_tool(['tools/train.py', cfg, '--work-dir', work, '--cfg-options', 'train_cfg.max_epochs=1'] + opts)
    from cbn_mmdet.engine.checkpoint import load_local_checkpoint
    ckpt = load_local_checkpoint(osp.join(work, 'epoch_1.pth'))
    assert 'cbn_window' not in ckpt
    out = run_tool(['tools/train.py', cfg, '--work-dir', work, '--resume', '--cfg-options',
                    'train_cfg.max_epochs=2'] + opts)
    assert 'the checkpoint holds no window (saved with save_window=False)' in out
    resumed = load_local_checkpoint(osp.join(work, 'epoch_2.pth'))['state_dict']
    assert resumed['neck.fpn_convs.0.bn.cbn_step'].item() == 8


@pytest.mark.parametrize('ema_type,update_buffers', [('ExponentialMovingAverage', False),
                                                     ('ExpMomentumEMA', True)])
def test_ema_hook_trains_past_burnin_and_validates(tiny_data, tmp_path, ema_type, update_buffers):
    """mmengine's EMAHook with mmengine's and mmdet's averaged models: the window is used
    from the second iteration (burn-in 0), the EMA model validates after the epoch, and the
    checkpoint's EMA state holds BN's buffers and the counters (no window: not averaged)."""
    cfg = _inherit(tmp_path, 'ema.py', "custom_hooks = [dict(type='CBNHook', burnin_epochs=0), "
                   f"dict(type='EMAHook', ema_type={ema_type!r}, update_buffers={update_buffers}, "
                   'priority=49)]\n')
    work = str(tmp_path / 'work')
    out = run_tool(['tools/train.py', cfg, '--work-dir', work, '--cfg-options',
                    'train_cfg.max_epochs=1', 'train_cfg.val_interval=1'] + digits_options(tiny_data))
    assert 'coco/bbox_mAP' in out and 'Epoch(val)' in out
    from cbn_mmdet.engine.checkpoint import load_local_checkpoint
    ckpt = load_local_checkpoint(osp.join(work, 'epoch_1.pth'))
    ema, model = ckpt['ema_state_dict'], ckpt['state_dict']
    assert 'module.neck.fpn_convs.0.bn.running_var' in ema
    assert not [k for k in ema if '.cbn_' in k and not k.endswith(('.cbn_step', '.cbn_skipped'))]
    assert ckpt['cbn_window']['neck.fpn_convs.0.bn']['cbn_valid'].sum() > 0  # the window was used
    # mmengine swaps the EMA weights into 'state_dict' and keeps the trained ones in
    # 'ema_state_dict': they differ after 4 steps, running statistics too when averaged.
    key = 'neck.fpn_convs.0.conv.weight'
    assert not torch.equal(ema['module.' + key], model[key])
    same = torch.equal(ema['module.neck.fpn_convs.0.bn.running_var'], model['neck.fpn_convs.0.bn.running_var'])
    assert same != update_buffers


@pytest.mark.skipif(tuple(int(v) for v in torch.__version__.split('.')[:2]) < (2, 2),
                    reason="torch 2.1's dynamo fails on mmdet's DetDataPreprocessor before any "
                    'CBN layer (scalar_tensor on a list of images, TorchRuntimeError): measured '
                    'on 2.1.2, a torch limitation')
def test_mmengine_compile_keeps_the_compensation_in_every_layer(tiny_data, tmp_path):
    """mmengine's ``compile`` option (here ``backend='aot_eager'``) on the quick-start Mask R-CNN:
    dynamo really traces the model (its graph-break log), CBNHook keeps the convs feeding the
    CBN layers eager, and every CBN layer stored derivatives (it found its conv) with no
    fallback warning."""
    cfg = _inherit(tmp_path, 'compiled.py', "custom_hooks = [dict(type='CBNHook', burnin_epochs=0)]\n"
                   "compile = dict(backend='aot_eager')\n")
    work = str(tmp_path / 'work')
    out = run_tool(['tools/train.py', cfg, '--work-dir', work, '--cfg-options',
                    'train_cfg.max_epochs=1', 'train_cfg.val_interval=10'] + digits_options(tiny_data),
                   env=dict(TORCH_LOGS='graph_breaks'))
    assert 'Model has been "compiled"' in out
    assert 'Graph break' in out  # dynamo traced the model (it breaks at each CBN layer)
    assert 'torch.compile: the ' in out and 'convs feeding them run eagerly' in out
    assert 'not from a 2-d conv' not in out and 'keep_producing_convs_eager' not in out
    from cbn_mmdet.engine.checkpoint import load_local_checkpoint
    windows = load_local_checkpoint(osp.join(work, 'epoch_1.pth'))['cbn_window']
    assert windows and all(w['cbn_dnu'].dim() == 4 and w['cbn_dnu'].abs().sum() > 0
                           for w in windows.values()), [n for n, w in windows.items()
                                                        if w['cbn_dnu'].dim() != 4]
