"""Study: quality of the statistics BN, plain averaging and CBN normalize with, during real
training of the quick-start detector at 2 images per iteration (docs/studies.md, study 1).

    python tools/studies/stats_quality.py [--out results/stats_quality]

Trains configs/studies/mask-rcnn_r18-w32_fpn_cbn_1xb2-2e_digits_stats.py (CBNStatsProbeHook
records every 25 iterations), then writes cbn_stats.jsonl and stats_quality.png under --out.
"""
import argparse
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = 'configs/studies/mask-rcnn_r18-w32_fpn_cbn_1xb2-2e_digits_stats.py'


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--out', default='results/stats_quality')
    p.add_argument('--work-dir', default='work_dirs/study_stats')
    a = p.parse_args(argv)
    for cmd in ([sys.executable, 'tools/make_digits_coco.py'],
                [sys.executable, 'tools/train.py', CONFIG, '--work-dir', a.work_dir]):
        subprocess.run(cmd, cwd=ROOT, check=True)
    out = os.path.join(ROOT, a.out)
    os.makedirs(out, exist_ok=True)
    records = os.path.join(out, 'cbn_stats.jsonl')
    shutil.copy(os.path.join(ROOT, a.work_dir, 'cbn_stats.jsonl'), records)
    subprocess.run([sys.executable, 'tools/plot_cbn_stats.py', records, '--out',
                    os.path.join(out, 'stats_quality.png'), '--title',
                    'Mask R-CNN (digits, 2 images/iteration): statistics vs large-batch truth'],
                   cwd=ROOT, check=True)


if __name__ == '__main__':
    main()
