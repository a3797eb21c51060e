"""Study: detection at 2 images per iteration on the digits data - BN (train mode) vs GN vs CBN
in the FPN and the heads (configs/studies/mask-rcnn_r18-w32-gn_fpn_{bn,gn,cbn}_1xb2-3e_digits.py).

    python tools/studies/digits_detection.py [--seeds 0 1] [--out results/digits_detection]

Each run is tools/train.py with randomness.seed set; the val mAP after the last epoch is read
from the run's scalars. Writes results.csv, results.json and map_by_norm.png under --out.
"""
import argparse
import csv
import glob
import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = 'configs/studies/mask-rcnn_r18-w32-gn_fpn_{}_1xb2-3e_digits.py'
NORMS = ('bn', 'gn', 'cbn')


def final_records(work_dir):
    """The last evaluation's metrics and the last logged training loss, from the run's
    vis_data/scalars.json."""
    files = sorted(glob.glob(os.path.join(work_dir, '*', 'vis_data', 'scalars.json')))
    metrics, loss = {}, None
    with open(files[-1]) as f:
        for line in f:
            rec = json.loads(line)
            if 'coco/bbox_mAP' in rec:
                metrics = rec
            elif 'loss' in rec:
                loss = rec['loss']
    return metrics, loss


def final_metrics(work_dir):
    """The last evaluation's metrics of the run."""
    return final_records(work_dir)[0]


def plot(rows, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.5))
    for ax, key, title in zip(axes, ('bbox_mAP', 'segm_mAP'), ('box mAP', 'mask mAP')):
        for i, norm in enumerate(NORMS):
            vals = [r[key] for r in rows if r['norm'] == norm]
            if not vals:
                continue
            ax.bar(i, np.mean(vals), color=f'C{i}', alpha=0.6)
            ax.scatter([i] * len(vals), vals, color='k', s=12, zorder=3)
        ax.set_xticks(range(len(NORMS)), [n.upper() for n in NORMS])
        ax.set_title(title + ' (bar: mean, dots: seeds)')
        ax.grid(axis='y', alpha=0.3)
    fig.suptitle('Digits detection at 2 images/iteration: norm in FPN and heads')
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--out', default='results/digits_detection')
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1])
    p.add_argument('--norms', nargs='+', default=list(NORMS))
    p.add_argument('--cbn-burnin-epochs', type=float, default=None,
                   help="override the CBN config's burn-in (0.5 epoch)")
    a = p.parse_args(argv)
    os.makedirs(os.path.join(ROOT, a.out), exist_ok=True)
    subprocess.run([sys.executable, 'tools/make_digits_coco.py'], cwd=ROOT, check=True)
    rows = []
    for seed in a.seeds:
        for norm in a.norms:
            tag = f'{norm}_seed{seed}'
            opts = [f'randomness.seed={seed}']
            if norm == 'cbn' and a.cbn_burnin_epochs is not None:
                tag += f'_burnin{a.cbn_burnin_epochs:g}'
                opts.append(f'custom_hooks.0.burnin_epochs={a.cbn_burnin_epochs}')
            work = os.path.join('work_dirs', 'study_detection', tag)
            t = time.time()
            proc = subprocess.run(
                [sys.executable, 'tools/train.py', CONFIG.format(norm), '--work-dir', work,
                 '--cfg-options'] + opts,
                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            if proc.returncode:
                sys.exit(f'{norm} seed {seed} failed:\n{proc.stdout[-4000:]}')
            m = final_metrics(os.path.join(ROOT, work))
            rows.append(dict(norm=norm, seed=seed, cbn_burnin_epochs=a.cbn_burnin_epochs
                             if norm == 'cbn' else None, bbox_mAP=m['coco/bbox_mAP'],
                             bbox_mAP_50=m['coco/bbox_mAP_50'], segm_mAP=m['coco/segm_mAP'],
                             segm_mAP_50=m['coco/segm_mAP_50'], minutes=(time.time() - t) / 60))
            print(rows[-1], flush=True)
    out = os.path.join(ROOT, a.out)
    with open(os.path.join(out, 'results.csv'), 'w', newline='') as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    summary = {n: {k: float(np.mean([r[k] for r in rows if r['norm'] == n]))
                   for k in ('bbox_mAP', 'segm_mAP')} for n in a.norms}
    with open(os.path.join(out, 'results.json'), 'w') as f:
        json.dump(dict(args=vars(a), rows=rows, mean=summary), f, indent=1)
    plot(rows, os.path.join(out, 'map_by_norm.png'))
    print('\nmean over seeds')
    for n, v in summary.items():
        print(f"{n:4s} box mAP {v['bbox_mAP']:.3f}  mask mAP {v['segm_mAP']:.3f}")


if __name__ == '__main__':
    main()
