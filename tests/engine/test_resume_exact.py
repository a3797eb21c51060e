"""tools/train.py --resume mid-burn-in and mid-window repeats the uninterrupted run's losses."""
import glob
import json
import os.path as osp

import pytest

from tests.helpers import QUICKSTART, ROOT, digits_options, make_tiny_digits, run_tool

pytestmark = pytest.mark.integration


def _losses(work):
    out = {}
    for f in sorted(glob.glob(osp.join(work, '*', 'vis_data', 'scalars.json'))):
        with open(f) as fh:
            for line in fh:
                rec = json.loads(line)
                if 'loss' in rec:
                    out[rec['step']] = rec['loss']
    return out


def test_resume_mid_burnin_and_mid_window_matches_uninterrupted(tmp_path):
    data = make_tiny_digits(str(tmp_path / 'digits'), num_train=16, num_val=2)
    cfg = tmp_path / 'cfg.py'
    cfg.write_text(f"_base_ = '{osp.join(ROOT, QUICKSTART)}'\n"
                   "custom_hooks = [dict(type='CBNHook', burnin_epochs=1.5),\n"
                   "                dict(type='SeedPerIterationHook', seed=3)]\n"
                   "randomness = dict(seed=3, deterministic=True)\n")
    opts = digits_options(data, batch_size=4) + ['train_cfg.val_interval=10',
                                                 'default_hooks.checkpoint.interval=1',
                                                 'log_processor.window_size=1']
    env = dict(OMP_NUM_THREADS='1', MKL_NUM_THREADS='1')
    full = str(tmp_path / 'full')
    run_tool(['tools/train.py', str(cfg), '--work-dir', full, '--cfg-options',
              'train_cfg.max_epochs=3'] + opts, env=env)
    reference = _losses(full)
    assert sorted(reference) == list(range(1, 13))  # 4 iterations per epoch, burn-in 6
    for stop in (1, 2):  # resume at iteration 4 (mid burn-in) and 8 (2 steps into the window)
        work = str(tmp_path / f'stop{stop}')
        run_tool(['tools/train.py', str(cfg), '--work-dir', work, '--cfg-options',
                  f'train_cfg.max_epochs={stop}'] + opts, env=env)
        run_tool(['tools/train.py', str(cfg), '--work-dir', work, '--resume', '--cfg-options',
                  'train_cfg.max_epochs=3'] + opts, env=env)
        resumed = _losses(work)
        assert sorted(resumed) == sorted(reference)
        for step, loss in reference.items():
            assert resumed[step] == pytest.approx(loss, rel=1e-5, abs=1e-6), (stop, step)
