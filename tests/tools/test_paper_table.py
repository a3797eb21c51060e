"""Study 5's runner: its bookkeeping, and one study config through tools/dist_train.sh."""
import os
import os.path as osp

import pytest

from tools.studies import paper_table as pt


def _row(batch, arm, seed, box, mask):
    return dict(batch=batch, arm=arm, seed=seed, bbox_mAP=box, segm_mAP=mask)


def test_summary_and_the_third_seed_rule():
    rows = [_row(4, 'cbn', 0, 0.30, 0.20), _row(4, 'cbn', 1, 0.32, 0.22),
            _row(4, 'gn', 0, 0.315, 0.10), _row(4, 'gn', 1, 0.335, 0.12),   # box within 2 std
            _row(4, 'bn', 0, 0.10, 0.05), _row(4, 'bn', 1, 0.11, 0.06),     # far below
            _row(4, 'cbn-early', 0, 0.31, 0.21), _row(4, 'cbn-early', 1, 0.31, 0.21),  # a CBN variant
            _row(1, 'gn', 0, 0.31, 0.21)]
    s = pt.summarize(rows)
    assert s['cbn_4xb4']['bbox_mAP'] == pytest.approx(0.31)
    assert s['cbn_4xb4']['bbox_mAP_std'] == pytest.approx(0.01)
    assert s['gn_4xb4']['seeds'] == [0, 1]
    assert pt.best_other_if_close(rows, 4) == ['gn']
    assert pt.best_other_if_close(rows, 1) == []  # no CBN run at that batch
    far = rows + [_row(4, 'none', 0, 0.50, 0.40), _row(4, 'none', 1, 0.50, 0.40)]
    assert pt.best_other_if_close(far, 4) == []   # the best other arm is far above CBN
    assert '| 4x4 | GN | 0.325 +- 0.010 | 0.110 +- 0.010 | 2 | 38.5 / 35.0 |' in pt.markdown_table(s)


def test_schedule_options_stretch_the_1x_shape():
    """--epochs 24 through tools/train.py's --cfg-options parsing: lr steps at 16 and 22, one
    evaluation and one checkpoint at the end; 12 epochs leaves the config alone."""
    import argparse
    from mmengine.config import Config, DictAction
    assert pt.schedule_options(12) == []
    parser = argparse.ArgumentParser()
    parser.add_argument('--cfg-options', nargs='+', action=DictAction)
    opts = parser.parse_args(['--cfg-options'] + pt.schedule_options(24)).cfg_options
    cfg = Config.fromfile(osp.join(osp.dirname(pt.ROOT + '/'), pt.CONFIG.format(arm='cbn', batch=1)))
    before = cfg.param_scheduler[0]
    cfg.merge_from_dict(opts)
    assert cfg.train_cfg.max_epochs == 24 and cfg.train_cfg.val_interval == 24
    assert cfg.default_hooks.checkpoint.interval == 24
    assert cfg.param_scheduler[0] == before
    steps = cfg.param_scheduler[1]
    assert steps['type'] == 'MultiStepLR' and steps['end'] == 24 and steps['milestones'] == [16, 22]
    assert pt.schedule_options(36)[-1] == 'param_scheduler.1.milestones=[24,33]'


def test_table_with_precise_columns():
    rows = [dict(_row(1, 'cbn', s, 0.2 + s / 10, 0.1), precise_bbox_mAP=0.3 + s / 10, precise_segm_mAP=0.2)
            for s in (0, 1)] + [_row(1, 'gn', 0, 0.4, 0.3)]
    table = pt.markdown_table(pt.summarize(rows))
    assert '| 4x1 | CBN | 0.250 +- 0.050 | 0.100 +- 0.000 | 0.350 +- 0.050 | 0.200 +- 0.000 | 2 |  |' in table
    assert '| 4x1 | GN | 0.400 +- 0.000 | 0.300 +- 0.000 |  |  | 1 |  |' in table


def _write_runs(path, rows):
    import json
    path.mkdir()
    path.joinpath('runs.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
    return str(path)


def test_runs_merge_across_outputs_and_tabulate_by_length(tmp_path):
    """A run found in two outputs (study 5 kept no precise metrics) is one run, the precise
    copy kept; 24-epoch runs tabulate beside 12-epoch ones; a mismatch stops the report."""
    old = _write_runs(tmp_path / 'old', [_row(1, 'cbn', 0, 0.25, 0.16), _row(1, 'cbn', 1, 0.29, 0.17)])
    new = _write_runs(tmp_path / 'new', [dict(_row(1, 'cbn', 0, 0.25, 0.16), epochs=12,
                                              precise_bbox_mAP=0.26, precise_segm_mAP=0.165)])
    long = _write_runs(tmp_path / 'long', [dict(_row(1, 'cbn', s, 0.3, 0.2), epochs=24,
                                                precise_bbox_mAP=0.31, precise_segm_mAP=0.21) for s in (0, 1)])
    rows = pt.merge_runs([long, old, new])
    assert len(rows) == 4
    assert [r for r in rows if r['seed'] == 0 and r['epochs'] == 12][0]['precise_bbox_mAP'] == 0.26
    table = pt.convergence_table(rows, 1)
    assert '| CBN | 12 | 0.270 +- 0.020 | 0.165 +- 0.005 |  |  | 0, 1 |' in table  # precise: seed 0 only
    assert '| CBN | 24 | 0.300 +- 0.000 | 0.200 +- 0.000 | 0.310 +- 0.000 | 0.210 +- 0.000 | 0, 1 |' in table
    other = _write_runs(tmp_path / 'other', [_row(1, 'cbn', 0, 0.24, 0.16)])
    with pytest.raises(SystemExit, match='differs between study outputs'):
        pt.merge_runs([old, other])


def test_cells_are_checked():
    with pytest.raises(SystemExit, match='not in the study'):
        pt.main(['--cells', '8:cbn', '--out', '/nonexistent'])
    with pytest.raises(SystemExit, match='BATCH:ARM'):
        pt.main(['--cells', 'cbn'])


@pytest.mark.integration
def test_a_study_config_trains_through_dist_train(tmp_path, monkeypatch):
    """The SyncBN cell of 4 x 1 (SyncCBN with window 1) with 2 processes on tiny data: the
    pretrained backbone loads, training and evaluation run, the metrics are read back."""
    from tests.helpers import digits_options, make_tiny_digits
    from tools import pretrain_backbone
    data = make_tiny_digits(str(tmp_path / 'digits'), num_train=8, num_val=4)
    ckpt = str(tmp_path / 'backbone.pth')
    pretrain_backbone.main(['--num-train', '64', '--num-val', '16', '--epochs', '1',
                            '--batch-size', '32', '--threads', '1', '--out', ckpt])
    work = str(tmp_path / 'work')
    from tests.helpers import run_tool
    import socket
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        port = sock.getsockname()[1]
    out = run_tool(['-m', 'torch.distributed.run', '--nproc_per_node=2', f'--master_port={port}',
                    'tools/train.py', pt.CONFIG.format(arm='syncbn', batch=1), '--launcher',
                    'pytorch', '--work-dir', work, '--cfg-options',
                    f'model.backbone.init_cfg.checkpoint={ckpt}', 'train_cfg.max_epochs=1',
                    'train_cfg.val_interval=1'] + digits_options(data, batch_size=1)[:5],
                   env=dict(OMP_NUM_THREADS='1'))
    assert f'load model from: {ckpt}' in out
    assert 'Epoch(train) [1][4/4]' in out        # 8 images / (1 per process x 2 processes)
    metrics, loss = pt.final_records(work)
    assert 0.0 <= metrics['coco/bbox_mAP'] <= 1.0 and 0.0 <= metrics['coco/segm_mAP'] <= 1.0
    assert loss is not None and loss == loss
    from mmengine.config import Config
    model = Config.fromfile(osp.join(work, osp.basename(pt.CONFIG.format(arm='syncbn', batch=1)))).model
    for norm in (model.neck.norm_cfg, model.roi_head.bbox_head.norm_cfg, model.roi_head.mask_head.norm_cfg):
        assert norm == dict(type='SyncCBN', window=1, requires_grad=True)
    # --precise: tools/precise_stats.py then tools/test.py on the final checkpoint (each run
    # through tests/helpers.run_tool, under its deadline)
    monkeypatch.setattr(pt, 'run_tool', lambda args, env: run_tool(args, env=env))
    options = [f'model.backbone.init_cfg.checkpoint={ckpt}', 'train_cfg.max_epochs=1'] + \
        digits_options(data, batch_size=1)[:5]
    precise, layers = pt.precise_metrics(pt.CONFIG.format(arm='syncbn', batch=1),
                                         osp.join(work, 'epoch_1.pth'), work, options, 8,
                                         dict(os.environ, OMP_NUM_THREADS='1'))
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    from cbn_mmdet import SyncCrossIterationBatchNorm2d as SyncCBN
    register_all_modules()
    built = MODELS.build(model)
    assert layers == sum(isinstance(m, SyncCBN) for m in built.modules()) > 0  # backbone BN: norm_eval
    assert 0.0 <= precise['coco/bbox_mAP'] <= 1.0 and 0.0 <= precise['coco/segm_mAP'] <= 1.0
