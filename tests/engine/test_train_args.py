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


def test_amp_without_an_accelerator_exits_in_one_line_before_building(monkeypatch, capsys):
    import sys

    import torch

    import tools.train as train
    if torch.cuda.is_available():
        pytest.skip('this machine has CUDA: --amp is valid here')
    monkeypatch.setattr(train, 'load_config', lambda *a: pytest.fail('the config was read'))
    with pytest.raises(SystemExit) as exc:
        train.main([QUICKSTART, '--amp'])
    assert str(exc.value).startswith('tools/train.py: error: --amp needs a CUDA')
    # as a user runs it: one line on stderr, exit status 1
    from tests.helpers import ROOT
    from tests.multiproc import run_split
    rc, _, err = run_split([sys.executable, 'tools/train.py', QUICKSTART, '--amp'], cwd=ROOT,
                           deadline=120)
    assert rc == 1 and len(err.strip().splitlines()) == 1, err
    assert '--amp needs a CUDA' in err
