"""The quick-start job: make the digits data (if missing), train the small CBN Mask R-CNN with
tools/train.py, evaluate the final checkpoint with tools/test.py, print bbox/segm mAP.

    .venv/bin/python tools/quickstart.py [--work-dir work_dirs/quickstart] [--epochs N]

The work dir keeps the training log, the dumped config and the checkpoints.
"""
import argparse
import ast
import os
import os.path as osp
import subprocess
import sys
import time

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
CONFIG = 'configs/quickstart/mask-rcnn_r18-w32_fpn_cbn_1xb8-8e_digits.py'


def run(cmd):
    """Run a tool, echoing its output (mmengine's progress log) live; return its lines."""
    print('+', ' '.join(cmd), flush=True)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1)
    lines = []
    for line in proc.stdout:
        lines.append(line.rstrip('\n'))
        print(line, end='', flush=True)
    if proc.wait():
        sys.exit(f'quickstart: {cmd[1]} failed with exit code {proc.returncode}')
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--work-dir', default='work_dirs/quickstart')
    p.add_argument('--epochs', type=int, default=None, help='override the config (default 8)')
    a = p.parse_args(argv)
    py = sys.executable
    t0 = time.time()
    run([py, 'tools/make_digits_coco.py'])
    train = [py, 'tools/train.py', CONFIG, '--work-dir', a.work_dir]
    if a.epochs:
        train += ['--cfg-options', f'train_cfg.max_epochs={a.epochs}',
                  f'train_cfg.val_interval={a.epochs}']
    run(train)
    t_train = time.time() - t0
    with open(osp.join(ROOT, a.work_dir, 'last_checkpoint')) as f:
        ckpt = f.read().strip()
    out = run([py, 'tools/test.py', CONFIG, ckpt, '--work-dir', osp.join(a.work_dir, 'test')])
    metrics = ast.literal_eval(out[-1])
    total = time.time() - t0
    print('\n== quick start summary ==')
    print(f'checkpoint: {ckpt}')
    print(f"val bbox mAP: {metrics['coco/bbox_mAP']:.3f} (AP50 {metrics['coco/bbox_mAP_50']:.3f})")
    print(f"val segm mAP: {metrics['coco/segm_mAP']:.3f} (AP50 {metrics['coco/segm_mAP_50']:.3f})")
    print(f'time: {total / 60:.1f} min in all ({t_train / 60:.1f} min data + training)')
    os.makedirs(osp.join(ROOT, a.work_dir), exist_ok=True)
    with open(osp.join(ROOT, a.work_dir, 'summary.txt'), 'w') as f:
        f.write(f'{metrics}\ntotal_seconds={total:.0f}\n')
    return metrics


if __name__ == '__main__':
    main()
