"""Study 5: the paper's COCO table in miniature, through the real configs and the launch script.

Each run is ``tools/dist_train.sh CONFIG 4`` (4 processes, gloo on CPU: each process normalizes
its own images, as each GPU does) on a config of configs/studies/paper_table/, which inherits
the real configs/cbn/*_4xb{4,2,1}-1x_coco.py and changes only data, backbone (pretrained here,
BN frozen), image size and schedule length (see _miniature.py). Box and mask mAP on the val split.

    python tools/studies/paper_table.py [--seeds 0 1] [--cells 4:cbn 4:gn ...] [--third-seed]
        [--out results/paper_table]

Runs already in ``--out``/runs.jsonl are not repeated (the study can be stopped and resumed).
With ``--third-seed`` a seed 2 is added, after the first two, for CBN and the best other arm at
a per-GPU batch where the two are within two standard deviations. Writes runs.jsonl (one line per run as it
finishes), results.csv, results.json, table.md and map_by_arm.png under --out.
"""
import argparse
import csv
import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from tools.studies.digits_detection import final_records  # noqa: E402  (study 3's reader)
CONFIG = 'configs/studies/paper_table/mask-rcnn_r18-w32-digits_fpn_{arm}_4xb{batch}-12e_digits.py'
ARMS = ('none', 'bn', 'syncbn', 'gn', 'cbn', 'synccbn', 'cbn-early')
LABELS = dict(none='- (frozen BN only)', bn='BN (per process)', syncbn='SyncBN', gn='GN',
              cbn='CBN', synccbn='SyncCBN', **{'cbn-early': 'CBN, burn-in 1 epoch'})
# An arm that is another arm's config with options: the window from epoch 1, at the full lr.
VARIANTS = {'cbn-early': ('cbn', ['custom_hooks.0.burnin_epochs=1'])}
CELLS = tuple([(4, a) for a in ARMS] + [(b, a) for b in (2, 1) for a in ('bn', 'syncbn', 'gn', 'cbn')]
              + [(1, 'cbn-early')])
# Yao et al. 2020, Mask R-CNN R50-FPN 1x on COCO val, 4 GPUs x 4 images: (box AP, mask AP)
PAPER = dict(none=(37.6, 34.0), syncbn=(38.5, 34.3), gn=(38.5, 35.0), cbn=(38.4, 34.7))
KEYS = ('bbox_mAP', 'segm_mAP')


def run_one(batch, arm, seed, port):
    work = os.path.join('work_dirs', 'study_paper_table', f'{arm}_4xb{batch}_seed{seed}')
    env = dict(os.environ, OMP_NUM_THREADS='1', PORT=str(port))
    config_arm, options = VARIANTS.get(arm, (arm, []))
    t = time.time()
    proc = subprocess.run(
        ['bash', 'tools/dist_train.sh', CONFIG.format(arm=config_arm, batch=batch), '4', '--work-dir',
         work, '--cfg-options', f'randomness.seed={seed}'] + options,
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode:
        sys.exit(f'{arm} 4xb{batch} seed {seed} failed:\n{proc.stdout[-6000:]}')
    m, loss = final_records(os.path.join(ROOT, work))
    return dict(batch=batch, arm=arm, seed=seed, bbox_mAP=m['coco/bbox_mAP'],
                bbox_mAP_50=m['coco/bbox_mAP_50'], segm_mAP=m['coco/segm_mAP'],
                segm_mAP_50=m['coco/segm_mAP_50'], final_loss=loss,
                minutes=round((time.time() - t) / 60, 2))


def summarize(rows):
    out = {}
    for b, a in CELLS:
        got = [r for r in rows if r['batch'] == b and r['arm'] == a]
        if got:
            out[f'{a}_4xb{b}'] = dict(batch=b, arm=a, seeds=[r['seed'] for r in got], **{
                k + s: float(f(np.array([r[k] for r in got])))
                for k in KEYS for s, f in (('', np.mean), ('_std', np.std))})
    return out


def best_other_if_close(rows, batch):
    """[the best non-CBN arm at ``batch``] (by mean box mAP) when its mean box or mask mAP is
    within two standard deviations of CBN's, else []: the cells that get a third seed."""
    s = summarize(rows)
    cbn = s.get(f'cbn_4xb{batch}')
    others = [v for v in s.values() if v['batch'] == batch and v['arm'] != 'cbn' and v['arm'] not in VARIANTS]
    if cbn is None or not others:
        return []
    best = max(others, key=lambda v: v['bbox_mAP'])
    close = any(abs(best[k] - cbn[k]) <= 2 * max(best[k + '_std'], cbn[k + '_std']) for k in KEYS)
    return [best['arm']] if close else []


def plot(rows, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(15, 4.2))
    batches = sorted({r['batch'] for r in rows}, reverse=True)
    for ax, key, title in zip(axes, KEYS, ('box mAP', 'mask mAP')):
        x = 0
        ticks, names = [], []
        for b in batches:
            for i, a in enumerate(ARMS):
                vals = [r[key] for r in rows if r['batch'] == b and r['arm'] == a]
                if not vals:
                    continue
                ax.bar(x, np.mean(vals), color=f'C{i}', alpha=0.6, label=LABELS[a] if b == batches[0] else None)
                ax.scatter([x] * len(vals), vals, color='k', s=10, zorder=3)
                ticks.append(x)
                names.append(a.replace('-', '-\n') + f'\n4x{b}')
                x += 1
            x += 1
        ax.set_xticks(ticks, names, fontsize=7)
        lo = min(r[key] for r in rows)
        ax.set_ylim(max(0, lo - 0.05), None)
        ax.set_title(title + ' on val (bar: mean, dots: seeds)')
        ax.grid(axis='y', alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle('Digits Mask R-CNN, pretrained frozen-BN backbone, 4 processes x {4, 2, 1} images: '
                 'norm in FPN and heads')
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--out', default='results/paper_table')
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1])
    p.add_argument('--cells', nargs='+', default=None,
                   help='BATCH:ARM pairs to run (default: all 14), e.g. 4:cbn 1:gn')
    p.add_argument('--third-seed', action='store_true',
                   help='add seed 2 where CBN and the best other arm are within two std')
    p.add_argument('--port', type=int, default=29531)
    p.add_argument('--report', action='store_true',
                   help='only write the outputs from the runs already in runs.jsonl')
    a = p.parse_args(argv)
    cells = CELLS
    if a.cells:
        try:
            cells = [(int(c.split(':')[0]), c.split(':')[1]) for c in a.cells]
        except (IndexError, ValueError):
            sys.exit(f'--cells takes BATCH:ARM pairs, got {a.cells}')
        bad = [c for c in cells if c not in CELLS]
        if bad:
            sys.exit(f'--cells: {bad} not in the study; choose from '
                     f'{" ".join(f"{b}:{x}" for b, x in CELLS)}')
    out = os.path.join(ROOT, a.out)
    os.makedirs(out, exist_ok=True)
    if not a.report:
        subprocess.run([sys.executable, 'tools/make_digits_coco.py'], cwd=ROOT, check=True)
        subprocess.run([sys.executable, 'tools/pretrain_backbone.py'], cwd=ROOT, check=True)
    log = os.path.join(out, 'runs.jsonl')
    rows = []
    if os.path.exists(log):
        with open(log) as f:
            rows = [json.loads(line) for line in f if line.strip()]

    def ensure(batch, arm, seed):
        if a.report or any(r['batch'] == batch and r['arm'] == arm and r['seed'] == seed for r in rows):
            return
        rows.append(run_one(batch, arm, seed, a.port))
        with open(log, 'a') as f:
            f.write(json.dumps(rows[-1]) + '\n')
        print(rows[-1], flush=True)

    for seed in a.seeds:
        for batch, arm in cells:
            ensure(batch, arm, seed)
    if not rows:
        sys.exit(f'no runs in {log}')
    if a.third_seed:
        for batch in sorted({b for b, _ in cells}, reverse=True):
            for arm in ['cbn'] + best_other_if_close(rows, batch):
                if (batch, arm) in cells:
                    ensure(batch, arm, 2)
    summary = summarize(rows)
    with open(os.path.join(out, 'results.csv'), 'w', newline='') as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(sorted(rows, key=lambda r: (-r['batch'], ARMS.index(r['arm']), r['seed'])))
    with open(os.path.join(out, 'results.json'), 'w') as f:
        needs_third = {f'4x{b}': best_other_if_close(rows, b) for b in sorted({r['batch'] for r in rows})}
        json.dump(dict(args=vars(a), paper_mask_rcnn_4xb4=PAPER, summary=summary,
                       third_seed_needed_for=needs_third), f, indent=1)
    plot(rows, os.path.join(out, 'map_by_arm.png'))
    table = markdown_table(summary)
    with open(os.path.join(out, 'table.md'), 'w') as f:
        f.write(table)
    print('\n' + table)


def markdown_table(summary):
    """Mean +- std over seeds per cell, the paper's Mask R-CNN row (COCO, 4x4) beside it."""
    lines = ['| per-GPU batch | norm in FPN + heads | box mAP | mask mAP | seeds | paper box / mask AP (COCO, 4x4) |',
             '|---|---|---|---|---|---|']
    for v in summary.values():
        paper = PAPER.get(v['arm']) if v['batch'] == 4 else None
        lines.append(f"| 4x{v['batch']} | {LABELS[v['arm']]} | {v['bbox_mAP']:.3f} +- {v['bbox_mAP_std']:.3f} "
                     f"| {v['segm_mAP']:.3f} +- {v['segm_mAP_std']:.3f} | {len(v['seeds'])} "
                     f"| {'%.1f / %.1f' % paper if paper else ''} |")
    return '\n'.join(lines) + '\n'


if __name__ == '__main__':
    main()
