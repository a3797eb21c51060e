"""The README's quick-start command, shortened to one epoch: data, training, evaluation."""
import glob
import os.path as osp

import pytest

from tests.helpers import run_tool

pytestmark = pytest.mark.integration


def test_quickstart_one_epoch(tmp_path):
    work = str(tmp_path / 'qs')
    out = run_tool(['tools/quickstart.py', '--epochs', '1', '--work-dir', work], timeout=1800)
    assert '== quick start summary ==' in out
    line = next(x for x in out.splitlines() if x.startswith('val bbox mAP'))
    assert 0.0 <= float(line.split()[3]) <= 1.0
    assert 'CBNHook: 16 CBN layers' in out
    assert osp.isfile(osp.join(work, 'epoch_1.pth'))
    assert glob.glob(osp.join(work, '*', '*.log'))  # mmengine's log
    assert osp.isfile(osp.join(work, 'mask-rcnn_r18-w32_fpn_cbn_1xb8-8e_digits.py'))  # the config
