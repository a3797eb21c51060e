"""tools/train.py's options change the config as MMDetection's tools/train.py does."""
import pytest

from tests.helpers import QUICKSTART
from tools.train import apply_train_args, load_config, parse_args


def _cfg(*extra):
    args = parse_args([QUICKSTART, *extra])
    return apply_train_args(load_config(args), args)


def test_amp_auto_scale_lr_resume_cfg_options():
    cfg = _cfg('--amp', '--auto-scale-lr', '--cfg-options', 'train_dataloader.batch_size=3')
    assert cfg.optim_wrapper.type == 'AmpOptimWrapper' and cfg.optim_wrapper.loss_scale == 'dynamic'
    assert cfg.auto_scale_lr.enable is True and cfg.auto_scale_lr.base_batch_size == 8
    assert cfg.train_dataloader.batch_size == 3
    assert _cfg('--resume').resume is True and _cfg('--resume').load_from is None
    cfg = _cfg('--resume', 'work/epoch_3.pth')
    assert cfg.resume is True and cfg.load_from == 'work/epoch_3.pth'
    assert _cfg().work_dir.endswith('work_dirs/mask-rcnn_r18-w32_fpn_cbn_1xb8-8e_digits')


def test_auto_scale_lr_needs_base_batch_size():
    with pytest.raises(RuntimeError, match='base_batch_size'):
        _cfg('--auto-scale-lr', '--cfg-options', 'auto_scale_lr=None')
