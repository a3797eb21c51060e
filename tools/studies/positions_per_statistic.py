"""Study: where small batches break BN - accuracy against the positions per statistic.

Whether a batch is "small" for BN depends on how many positions m = N*H*W each statistic sees,
not on N alone. This runs the classification study of ``digits_classification.py`` (same small
ResNet, data split, schedule and evaluation in eval mode) at two input sizes, 8x8 and 16x16 (the
deepest norms see 2x2 and 4x4 positions), batch sizes 32..1, with BN, GN, plain cross-iteration
averaging and CBN (window 4), several seeds, and plots test accuracy against m at the deepest
norm (for the windowed norms also against k*m, the positions the window pools).

    python tools/studies/positions_per_statistic.py [--seeds 0 1 2] [--jobs 2]
        [--out results/positions_per_statistic]

Writes results.csv, results.json and accuracy_vs_positions.png under --out. ``--jobs`` runs the
two input sizes in parallel processes (one thread each).
"""
import argparse
import csv
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

NORMS = ('BN', 'GN', 'plain', 'CBN')


def deepest_positions(size: int, batch: int) -> int:
    """m at the last stage of SmallResNet: two stride-2 stages, so (size / 4)^2 per image."""
    return batch * (size // 4) ** 2


def run_size(size, batches, norms, seeds, epochs, base_lr, window, burnin_frac):
    import torch
    from tools.studies.digits_classification import load_data, train_eval
    torch.set_num_threads(1)
    data = load_data(size)
    rows, t0 = [], time.time()
    for batch in batches:
        for norm in norms:
            for seed in seeds:
                r = train_eval(norm, batch, seed, data, epochs, base_lr, window, burnin_frac)
                r.update(size=size, m=deepest_positions(size, batch),
                         pooled=deepest_positions(size, batch) * (window if norm in ('plain', 'CBN') else 1))
                rows.append(r)
                print(f"size {size:2d} batch {batch:2d} {norm:5s} seed {seed}: test "
                      f"{r['test_acc']:.3f} [{time.time() - t0:.0f}s]", flush=True)
    return rows


def plot(rows, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    styles = {8: 'o-', 16: 's--'}
    for ax, key, label in ((axes[0], 'm', 'positions per statistic m = N*H*W at the deepest norm'),
                           (axes[1], 'pooled', 'positions pooled (k*m for plain/CBN, k = window)')):
        for ni, norm in enumerate(n for n in NORMS if any(r['norm'] == n for r in rows)):
            for size in sorted({r['size'] for r in rows}):
                pts = sorted({r[key] for r in rows if r['norm'] == norm and r['size'] == size})
                accs = [[r['test_acc'] for r in rows if r['norm'] == norm and r['size'] == size
                         and r[key] == p] for p in pts]
                ax.errorbar(pts, [np.mean(a) for a in accs], yerr=[np.std(a) for a in accs],
                            fmt=styles.get(size, 'o-'), color=f'C{ni}', capsize=2,
                            label=f'{norm} {size}x{size}')
        ax.set_xscale('log', base=2)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel('test accuracy (eval mode), mean +- std over seeds')
    axes[1].legend(fontsize=7, ncol=2)
    fig.suptitle('Digits, small ResNet: test accuracy against the positions each statistic sees')
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--out', default='results/positions_per_statistic')
    p.add_argument('--sizes', type=int, nargs='+', default=[8, 16])
    p.add_argument('--batches', type=int, nargs='+', default=[32, 16, 8, 4, 2, 1])
    p.add_argument('--norms', nargs='+', default=list(NORMS), choices=NORMS)
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    p.add_argument('--epochs', type=int, default=4)
    p.add_argument('--base-lr', type=float, default=0.1, help='learning rate at batch 32')
    p.add_argument('--window', type=int, default=4)
    p.add_argument('--burnin-frac', type=float, default=0.25)
    p.add_argument('--jobs', type=int, default=2, help='input sizes run in parallel')
    a = p.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    args = (a.batches, a.norms, a.seeds, a.epochs, a.base_lr, a.window, a.burnin_frac)
    if a.jobs > 1 and len(a.sizes) > 1:
        with ProcessPoolExecutor(min(a.jobs, len(a.sizes))) as ex:
            rows = sum(ex.map(run_size, a.sizes, *[[x] * len(a.sizes) for x in args]), [])
    else:
        rows = sum((run_size(s, *args) for s in a.sizes), [])
    with open(os.path.join(a.out, 'results.csv'), 'w', newline='') as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    table = {}
    for r in rows:
        table.setdefault((r['size'], r['batch'], r['norm']), []).append(r['test_acc'])
    summary = [dict(size=s, batch=b, m=deepest_positions(s, b), norm=n, mean=float(np.mean(v)),
                    std=float(np.std(v)), seeds=len(v)) for (s, b, n), v in sorted(table.items())]
    with open(os.path.join(a.out, 'results.json'), 'w') as f:
        json.dump(dict(args=vars(a), rows=rows, summary=summary), f, indent=1)
    plot(rows, os.path.join(a.out, 'accuracy_vs_positions.png'))
    print('\ntest accuracy, mean +- std over seeds')
    print(f"{'size':>4} {'batch':>5} {'m':>5} " + ' '.join(f'{n:>13}' for n in a.norms))
    for s in a.sizes:
        for b in a.batches:
            cells = [table[(s, b, n)] for n in a.norms]
            print(f'{s:4d} {b:5d} {deepest_positions(s, b):5d} ' +
                  ' '.join(f'{np.mean(c):6.3f}+-{np.std(c):5.3f}' for c in cells))


if __name__ == '__main__':
    main()
