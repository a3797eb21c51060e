"""Plot the statistics-quality records written by CBNStatsProbeHook (cbn_stats.jsonl).

    python tools/plot_cbn_stats.py WORK_DIR/cbn_stats.jsonl [--out stats.png]

Two panels (mean error in units of the true std, relative variance error) vs iteration; for
each estimator (BN: this batch only, plain averaging, CBN) the median over the probed layers.
"""
import argparse
import json

import numpy as np

KINDS = (('batch', 'BN (one batch)'), ('plain', 'plain averaging'), ('cbn', 'CBN (compensated)'))


def load(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def summarize(records):
    """{kind: {'iters': [...], 'mean_err': [...], 'var_err': [...]}} with medians over layers."""
    out = {k: dict(iters=[], mean_err=[], var_err=[]) for k, _ in KINDS}
    for rec in records:
        if not rec['layers']:
            continue
        for kind, _ in KINDS:
            out[kind]['iters'].append(rec['iter'])
            for err in ('mean_err', 'var_err'):
                out[kind][err].append(float(np.median(
                    [layer[kind][err] for layer in rec['layers'].values()])))
    return out


def plot(summary, path, title=''):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, err, label in zip(axes, ('mean_err', 'var_err'),
                              ('mean error / true std', 'relative variance error')):
        for kind, name in KINDS:
            s = summary[kind]
            ax.plot(s['iters'], s[err], marker='.', label=name)
        ax.set_yscale('log')
        ax.set_xlabel('iteration')
        ax.set_ylabel(label + ' (median over layers)')
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(title or 'Statistics used for normalization vs the large-batch truth')
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('records')
    p.add_argument('--out', default='cbn_stats.png')
    p.add_argument('--title', default='')
    a = p.parse_args(argv)
    summary = summarize(load(a.records))
    plot(summary, a.out, a.title)
    for kind, name in KINDS:
        s = summary[kind]
        if s['iters']:
            print(f"{name:20s} median mean_err {np.median(s['mean_err']):.4f} "
                  f"var_err {np.median(s['var_err']):.4f} over {len(s['iters'])} probes")


if __name__ == '__main__':
    main()
