"""Study: image classification at small batch sizes on scikit-learn's handwritten digits.

A small ResNet (3 stages of BasicBlocks, 16-32-64 channels) on the digits upscaled to 16x16,
with BN, GN, plain cross-iteration averaging (CBN without compensation) or CBN, trained at
batch sizes 32, 8, 4, 2 and 1 for the same number of epochs (learning rate scaled linearly with
the batch size), several seeds. Evaluation uses the running statistics (eval mode); with
``--precise`` also the population statistics of the final weights over the 1,400 training
images (``recompute_precise_stats``, what ``PreciseStatsHook`` does in detection).

    python tools/studies/digits_classification.py [--seeds 0 1 2] [--out results/digits_classification]

Writes results.csv, results.json and accuracy_vs_batch.png under --out.
"""
import argparse
import csv
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from cbn_mmdet.cbn import CrossIterationBatchNorm2d  # noqa: E402
from cbn_mmdet.engine.precise_stats import recompute_precise_stats  # noqa: E402

NORMS = ('BN', 'GN', 'plain', 'CBN')


def make_norm(kind, c, window, burnin):
    if kind == 'BN':
        return nn.BatchNorm2d(c)
    if kind == 'GN':
        return nn.GroupNorm(min(8, c // 2), c)
    return CrossIterationBatchNorm2d(c, window=window, burnin=burnin, compensate=kind == 'CBN')


class Block(nn.Module):
    def __init__(self, cin, cout, stride, norm):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.n1 = norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.n2 = norm(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), norm(cout))

    def forward(self, x):
        out = F.relu(self.n1(self.conv1(x)))
        out = self.n2(self.conv2(out))
        return F.relu(out + (x if self.down is None else self.down(x)))


class SmallResNet(nn.Module):
    def __init__(self, norm):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, 1, 1, bias=False), norm(16), nn.ReLU())
        self.stages = nn.Sequential(Block(16, 16, 1, norm), Block(16, 32, 2, norm),
                                    Block(32, 64, 2, norm))
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(self.stages(self.stem(x)).mean((2, 3)))


def load_data(size, split_seed=0):
    """Digits upscaled to size x size, standardized; a fixed 1,400 / 397 split."""
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(size, size), mode='bilinear', align_corners=False)
    x = (x - x.mean()) / x.std()
    y = torch.tensor(d.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(split_seed))
    tr, te = perm[:1400], perm[1400:]
    return (x[tr], y[tr]), (x[te], y[te])


def train_eval(norm, batch, seed, data, epochs, base_lr, window, burnin_frac, precise_batch=0):
    (xtr, ytr), (xte, yte) = data
    torch.manual_seed(seed)
    steps = epochs * (len(xtr) // batch)
    burnin = int(burnin_frac * steps)
    model = SmallResNet(lambda c: make_norm(norm, c, window, burnin))
    lr = base_lr * batch / 32
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.2)
    g = torch.Generator().manual_seed(seed)
    model.train()
    correct = seen = 0
    for epoch in range(epochs):
        perm = torch.randperm(len(xtr), generator=g)
        for i in range(len(xtr) // batch):
            idx = perm[i * batch:(i + 1) * batch]
            logits = model(xtr[idx])
            loss = F.cross_entropy(logits, ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            if epoch == epochs - 1:
                correct += (logits.argmax(1) == ytr[idx]).sum().item()
                seen += len(idx)
    model.eval()
    with torch.no_grad():
        acc = (model(xte).argmax(1) == yte).float().mean().item()
    row = dict(norm=norm, batch=batch, seed=seed, lr=lr, steps=steps, burnin=burnin,
               train_acc=correct / seen, test_acc=acc)
    if precise_batch:  # population statistics of the final weights over the training set
        batches = xtr.split(precise_batch)
        recompute_precise_stats(model, batches, lambda m, b: m(b), num_images=len(xtr))
        with torch.no_grad():
            row['test_acc_precise'] = (model(xte).argmax(1) == yte).float().mean().item()
    return row


def plot(rows, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    batches = sorted({r['batch'] for r in rows}, reverse=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    for norm in [n for n in NORMS if any(r['norm'] == n for r in rows)]:
        mean, lo, hi = [], [], []
        for b in batches:
            accs = [r['test_acc'] for r in rows if r['norm'] == norm and r['batch'] == b]
            mean.append(np.mean(accs))
            lo.append(min(accs))
            hi.append(max(accs))
        xs = range(len(batches))
        line, = ax.plot(xs, mean, marker='o', label=norm)
        ax.fill_between(xs, lo, hi, alpha=0.15)
        if all('test_acc_precise' in r for r in rows) and norm != 'GN':
            prec = [np.mean([r['test_acc_precise'] for r in rows
                             if r['norm'] == norm and r['batch'] == b]) for b in batches]
            ax.plot(xs, prec, marker='s', linestyle='--', color=line.get_color(),
                    label=f'{norm}, precise statistics')
    ax.set_xticks(range(len(batches)), [str(b) for b in batches])
    ax.set_xlabel('batch size (images per iteration)')
    ax.set_ylabel('test accuracy (eval mode)')
    ax.set_title('Digits, small ResNet: accuracy vs batch size\n(line: mean over seeds, band: min-max'
                 + ('; dashed: eval with precise statistics)' if any('test_acc_precise' in r for r in rows)
                    else ')'), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--out', default='results/digits_classification')
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    p.add_argument('--batches', type=int, nargs='+', default=[32, 8, 4, 2, 1])
    p.add_argument('--norms', nargs='+', default=list(NORMS))
    p.add_argument('--epochs', type=int, default=4)
    p.add_argument('--base-lr', type=float, default=0.1, help='learning rate at batch 32')
    p.add_argument('--window', type=int, default=4)
    p.add_argument('--burnin-frac', type=float, default=0.25,
                   help='CBN burn-in as a fraction of the training steps')
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--size', type=int, default=16, help='image side after upscaling')
    p.add_argument('--precise', type=int, default=0, metavar='BATCH',
                   help='also evaluate with precise statistics, computed in passes of BATCH '
                        'training images (0: off)')
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    os.makedirs(a.out, exist_ok=True)
    data = load_data(a.size)
    rows = []
    t0 = time.time()
    for batch in a.batches:
        for norm in a.norms:
            for seed in a.seeds:
                r = train_eval(norm, batch, seed, data, a.epochs, a.base_lr, a.window, a.burnin_frac,
                               a.precise)
                rows.append(r)
                precise = f" precise {r['test_acc_precise']:.3f}" if a.precise else ''
                print(f"batch {batch:2d} {norm:5s} seed {seed}: test {r['test_acc']:.3f}{precise} "
                      f"train {r['train_acc']:.3f} [{time.time() - t0:.0f}s]", flush=True)
    with open(os.path.join(a.out, 'results.csv'), 'w', newline='') as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    summary = {f'{n}@{b}': float(np.mean([r['test_acc'] for r in rows
                                          if r['norm'] == n and r['batch'] == b]))
               for b in a.batches for n in a.norms}
    result = dict(args=vars(a), rows=rows, mean_test_acc=summary)
    if a.precise:
        result['mean_test_acc_precise'] = {
            f'{n}@{b}': float(np.mean([r['test_acc_precise'] for r in rows
                                       if r['norm'] == n and r['batch'] == b]))
            for b in a.batches for n in a.norms}
    with open(os.path.join(a.out, 'results.json'), 'w') as f:
        json.dump(result, f, indent=1)
    plot(rows, os.path.join(a.out, 'accuracy_vs_batch.png'))
    print('\nmean test accuracy over seeds')
    print('batch ' + ' '.join(f'{n:>7}' for n in a.norms))
    for b in a.batches:
        print(f'{b:5d} ' + ' '.join(f"{summary[f'{n}@{b}']:7.3f}" for n in a.norms))
    if a.precise:
        print('\nwith precise statistics')
        for b in a.batches:
            print(f'{b:5d} ' + ' '.join(f"{result['mean_test_acc_precise'][f'{n}@{b}']:7.3f}"
                                        for n in a.norms))


if __name__ == '__main__':
    main()
