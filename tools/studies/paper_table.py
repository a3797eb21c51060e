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
CELLS = tuple([(4, a) for a in ARMS] + [(b, a) for b in (2, 1) for a in ('none', 'bn', 'syncbn', 'gn', 'cbn')]
              + [(1, 'cbn-early')])
# Yao et al. 2020, Mask R-CNN R50-FPN 1x on COCO val, 4 GPUs x 4 images: (box AP, mask AP)
PAPER = dict(none=(37.6, 34.0), syncbn=(38.5, 34.3), gn=(38.5, 35.0), cbn=(38.4, 34.7))
KEYS = ('bbox_mAP', 'segm_mAP')
PRECISE_KEYS = tuple('precise_' + k for k in KEYS)


def schedule_options(epochs):
    """--cfg-options that stretch the miniature's 1x shape (lr steps at 8/12 and 11/12 of the
    run, one warmup epoch, one evaluation and one checkpoint at the end) to ``epochs``."""
    if epochs == 12:
        return []
    steps = [round(8 * epochs / 12), round(11 * epochs / 12)]
    return [f'train_cfg.max_epochs={epochs}', f'train_cfg.val_interval={epochs}',
            f'default_hooks.checkpoint.interval={epochs}', f'param_scheduler.1.end={epochs}',
            f'param_scheduler.1.milestones=[{steps[0]},{steps[1]}]']


def metrics_of_test(stdout):
    """The metrics dict tools/test.py prints as its last line."""
    import ast
    return ast.literal_eval(stdout.strip().splitlines()[-1])


def run_tool(args, env):
    """A repo tool with this interpreter; its output, or exit with its tail if it failed."""
    proc = subprocess.run([sys.executable] + args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    if proc.returncode:
        sys.exit(f'{" ".join(args[:3])} failed:\n{proc.stdout[-6000:]}')
    return proc.stdout


def precise_metrics(config, ckpt, work, options, num_images, env):
    """tools/precise_stats.py on the final checkpoint (one process, ``num_images`` training
    images), then tools/test.py on the new checkpoint: the val metrics with population statistics.
    A model without trained BN-family layers (no norm, GN) keeps its statistics, so its metrics
    are the running ones (``None`` returned, layers 0)."""
    def tool(args):
        return run_tool(args, env)
    cfg_options = ['--cfg-options'] + options if options else []
    out = tool(['tools/precise_stats.py', config, ckpt, '--num-images', str(num_images),
                '--work-dir', os.path.join(work, 'precise')] + cfg_options)
    layers = int(out.split('precise statistics of ')[1].split(' layers')[0])
    if layers == 0:
        return None, 0
    new = os.path.splitext(ckpt)[0] + '_precise.pth'
    m = metrics_of_test(tool(['tools/test.py', config, new, '--work-dir', os.path.join(work, 'precise_test')]
                             + cfg_options))
    return m, layers


def run_one(batch, arm, seed, port, epochs=12, precise=0):
    suffix = '' if epochs == 12 else f'_{epochs}e'
    work = os.path.join('work_dirs', 'study_paper_table', f'{arm}_4xb{batch}_seed{seed}{suffix}')
    env = dict(os.environ, OMP_NUM_THREADS='1', PORT=str(port))
    config_arm, options = VARIANTS.get(arm, (arm, []))
    options = options + schedule_options(epochs)
    config = CONFIG.format(arm=config_arm, batch=batch)
    t = time.time()
    ckpt = os.path.join(work, f'epoch_{epochs}.pth')
    trained = os.path.exists(os.path.join(ROOT, ckpt))  # a run stopped after training: not repeated
    if not trained:
        proc = subprocess.run(
            ['bash', 'tools/dist_train.sh', config, '4', '--work-dir',
             work, '--cfg-options', f'randomness.seed={seed}'] + options,
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if proc.returncode:
            sys.exit(f'{arm} 4xb{batch} seed {seed} failed:\n{proc.stdout[-6000:]}')
    m, loss = final_records(os.path.join(ROOT, work))
    row = dict(batch=batch, arm=arm, seed=seed, epochs=epochs, bbox_mAP=m['coco/bbox_mAP'],
               bbox_mAP_50=m['coco/bbox_mAP_50'], segm_mAP=m['coco/segm_mAP'],
               segm_mAP_50=m['coco/segm_mAP_50'], final_loss=loss,
               minutes=None if trained else round((time.time() - t) / 60, 2))
    if precise:
        t = time.time()
        pm, layers = precise_metrics(config, ckpt, work, options, precise, env)
        pm = pm or {f'coco/{k}': row[k] for k in ('bbox_mAP', 'bbox_mAP_50', 'segm_mAP', 'segm_mAP_50')}
        row.update({f'precise_{k}': pm[f'coco/{k}'] for k in ('bbox_mAP', 'bbox_mAP_50', 'segm_mAP', 'segm_mAP_50')},
                   precise_layers=layers, precise_images=precise,
                   precise_minutes=round((time.time() - t) / 60, 2))
    return row


def summarize(rows):
    out = {}
    for b, a in CELLS:
        got = [r for r in rows if r['batch'] == b and r['arm'] == a]
        if got:
            out[f'{a}_4xb{b}'] = dict(batch=b, arm=a, seeds=[r['seed'] for r in got], **{
                k + s: float(f(np.array([r[k] for r in got])))
                for k in KEYS + PRECISE_KEYS if all(k in r for r in got)
                for s, f in (('', np.mean), ('_std', np.std))})
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
                pre = [r['precise_' + key] for r in rows if r['batch'] == b and r['arm'] == a
                       and 'precise_' + key in r]
                if pre:
                    ax.scatter([x + 0.2] * len(pre), pre, color='r', marker='x', s=18, zorder=3,
                               label='precise BN statistics' if not ticks else None)
                ticks.append(x)
                names.append(a.replace('-', '-\n') + f'\n4x{b}')
                x += 1
            x += 1
        ax.set_xticks(ticks, names, fontsize=7)
        lo = min([r[key] for r in rows] + [r['precise_' + key] for r in rows if 'precise_' + key in r])
        ax.set_ylim(max(0, lo - 0.05), None)
        ax.set_title(title + ' on val (bar: mean, dots: seeds, x: precise statistics)')
        ax.grid(axis='y', alpha=0.3)
    axes[0].legend(fontsize=7)
    epochs = sorted({r.get('epochs', 12) for r in rows})
    fig.suptitle(f'Digits Mask R-CNN, {epochs[0]} epochs, pretrained frozen-BN backbone, 4 processes x '
                 f'{sorted(batches, reverse=True)} images: '
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
    p.add_argument('--epochs', type=int, default=12,
                   help='schedule length; the 1x shape is stretched (lr steps at 8/12 and 11/12)')
    p.add_argument('--precise', type=int, default=0, metavar='N',
                   help='also evaluate each final checkpoint with precise BN statistics from N '
                        'training images (tools/precise_stats.py, then tools/test.py)')
    p.add_argument('--compare', nargs='+', default=[], metavar='DIR',
                   help='outputs of runs at other lengths: write convergence.md/.png (mAP by epochs)')
    p.add_argument('--port', type=int, default=29531)
    p.add_argument('--report', action='store_true',
                   help='only write the outputs from the runs already in runs.jsonl')
    a = p.parse_args(argv)
    if a.epochs < 1 or a.precise < 0:
        sys.exit(f'--epochs must be >= 1 and --precise >= 0, got {a.epochs} and {a.precise}')
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
    rows = read_runs(out)

    def ensure(batch, arm, seed):
        if a.report or any(r['batch'] == batch and r['arm'] == arm and r['seed'] == seed for r in rows):
            return
        rows.append(run_one(batch, arm, seed, a.port, a.epochs, a.precise))
        with open(log, 'a') as f:
            f.write(json.dumps(rows[-1]) + '\n')
        print(rows[-1], flush=True)

    if not a.report and any(r.get('epochs', 12) != a.epochs for r in rows):
        sys.exit(f'{log} holds runs of another length than --epochs {a.epochs}: use another --out')
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
        w = csv.DictWriter(f, fieldnames=list(max(rows, key=len)))
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
    if a.compare:
        both = merge_runs([out] + [os.path.join(ROOT, d) for d in a.compare])
        table = ''.join(convergence_table(both, b) for b in sorted({r['batch'] for r in rows}, reverse=True))
        with open(os.path.join(out, 'convergence.md'), 'w') as f:
            f.write(table)
        plot_convergence([r for r in both if r['batch'] in {x['batch'] for x in rows}],
                         os.path.join(out, 'convergence.png'))
        print('\n' + table)


def read_runs(out):
    log = os.path.join(out, 'runs.jsonl')
    if not os.path.exists(log):
        return []
    with open(log) as f:
        return [json.loads(line) for line in f if line.strip()]


def merge_runs(outs):
    """The runs of several study outputs, one per (batch, arm, seed, epochs). A run found twice
    must have the same running-statistics metrics (training is deterministic); the copy with
    precise metrics is kept."""
    merged = {}
    for out in outs:
        for r in read_runs(out):
            r['epochs'] = r.get('epochs', 12)
            key = (r['batch'], r['arm'], r['seed'], r['epochs'])
            old = merged.get(key)
            if old is not None and any(old[k] != r[k] for k in KEYS):
                sys.exit(f'{key} differs between study outputs: {[old[k] for k in KEYS]} vs {[r[k] for k in KEYS]}')
            if old is None or len(r) > len(old):
                merged[key] = r
    return list(merged.values())


def convergence_table(rows, batch):
    """Per arm at ``batch``: mean +- std over seeds at each schedule length."""
    lines = [f'4 processes x {batch} image(s):\n',
             '| norm in FPN + heads | epochs | box mAP | mask mAP | box mAP, precise stats '
             '| mask mAP, precise stats | seeds |', '|---|---|---|---|---|---|---|']
    for arm in ARMS:
        for epochs in sorted({r['epochs'] for r in rows}):
            got = [r for r in rows if (r['batch'], r['arm'], r['epochs']) == (batch, arm, epochs)]
            if not got:
                continue
            cells = []
            for k in KEYS + PRECISE_KEYS:
                vals = [r[k] for r in got if k in r]
                cells.append(f'{np.mean(vals):.3f} +- {np.std(vals):.3f}' if len(vals) == len(got) else '')
            lines.append(f'| {LABELS[arm]} | {epochs} | ' + ' | '.join(cells)
                         + f" | {', '.join(str(r['seed']) for r in sorted(got, key=lambda r: r['seed']))} |")
    return '\n'.join(lines) + '\n\n'


def plot_convergence(rows, path):
    """mAP against schedule length per arm (solid: running statistics, dashed: precise)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    batches = sorted({r['batch'] for r in rows}, reverse=True)
    fig, axes = plt.subplots(len(batches), 2, figsize=(10, 3.8 * len(batches)), squeeze=False)
    for row_axes, b in zip(axes, batches):
        for ax, key, title in zip(row_axes, KEYS, ('box mAP', 'mask mAP')):
            for i, arm in enumerate(ARMS):
                got = [r for r in rows if r['batch'] == b and r['arm'] == arm]
                lengths = sorted({r['epochs'] for r in got})
                if len(lengths) < 2:
                    continue
                styles = [(key, '-')]
                if any(r.get('precise_layers') for r in got):  # else precise = running
                    styles.append(('precise_' + key, '--'))
                for k, style in styles:
                    pts = [(e, [r[k] for r in got if r['epochs'] == e and k in r]) for e in lengths]
                    pts = [(e, v) for e, v in pts  # precise only where every seed has it
                           if v and len(v) == sum(r['epochs'] == e for r in got)]
                    if not pts:
                        continue
                    ax.plot([e for e, _ in pts], [np.mean(v) for _, v in pts], style, color=f'C{i}',
                            marker='o', label=LABELS[arm] + (' (precise)' if style == '--' else ''))
                    for e, v in pts:
                        ax.scatter([e] * len(v), v, color=f'C{i}', s=8)
            ax.set_xlabel('epochs')
            ax.set_title(f'{title} on val, 4 processes x {b} image(s)')
            ax.grid(alpha=0.3)
        row_axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def markdown_table(summary):
    """Mean +- std over seeds per cell, the paper's Mask R-CNN row (COCO, 4x4) beside it."""
    precise = any(PRECISE_KEYS[0] in v for v in summary.values())
    head = '| per-GPU batch | norm in FPN + heads | box mAP | mask mAP |'
    if precise:
        head += ' box mAP, precise stats | mask mAP, precise stats |'
    lines = [head + ' seeds | paper box / mask AP (COCO, 4x4) |', '|---' * (head.count('|') + 1) + '|']

    def cell(v, k):
        return f"{v[k]:.3f} +- {v[k + '_std']:.3f}" if k in v else ''
    for v in summary.values():
        paper = PAPER.get(v['arm']) if v['batch'] == 4 else None
        ks = KEYS + (PRECISE_KEYS if precise else ())
        lines.append(f"| 4x{v['batch']} | {LABELS[v['arm']]} | " + ' | '.join(cell(v, k) for k in ks)
                     + f" | {len(v['seeds'])} | {'%.1f / %.1f' % paper if paper else ''} |")
    return '\n'.join(lines) + '\n'


if __name__ == '__main__':
    main()
