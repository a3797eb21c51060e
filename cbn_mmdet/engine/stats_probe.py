"""Statistics-quality probe: how far from the truth are the mean and variance that BN (one
batch), plain cross-iteration averaging and CBN normalize with, per layer and iteration.

The truth at iteration t is the large-batch statistic of the layer's input when the window's
batches (t-k+1 .. t) are re-run, as one batch, through the network with its weights at t (a copy
of the model whose norm layers normalize with the statistics of that large batch).

Use in any mmdet config::

    custom_hooks = [dict(type='CBNStatsProbeHook', interval=50)]

It writes one JSON line per probed iteration to ``<work_dir>/cbn_stats.jsonl``;
``tools/plot_cbn_stats.py`` plots it.
"""
import copy
import json
import os.path as osp
from collections import deque

import torch
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS

from ..cbn import CrossIterationBatchNorm2d


def estimate_errors(est_mean, est_var, true_mean, true_var, eps=1e-5):
    """Per-channel errors in natural units, averaged over channels: the mean error in units of
    the true standard deviation and the relative variance error."""
    std = (true_var + eps).sqrt()
    return (float(((est_mean - true_mean).abs() / std).mean()),
            float(((est_var - true_var).abs() / (true_var + eps)).mean()))


@torch.no_grad()
def large_batch_statistics(model, layer_names, run_forward):
    """Mean/var of each named CBN layer's input when ``run_forward(model_copy)`` runs; the copy's
    CBN layers act as BN over that (large) batch and nothing of ``model`` changes."""
    probe = copy.deepcopy(model)
    probe.train()
    stats, handles = {}, []
    modules = dict(probe.named_modules())
    for m in probe.modules():
        if isinstance(m, CrossIterationBatchNorm2d):
            m.window, m.burnin, m.probe = 1, 0, None
    for name in layer_names:
        def hook(_mod, args, name=name):
            y = args[0].double()
            if y.numel():
                stats.setdefault(name, []).append(
                    (y.sum((0, 2, 3)), (y * y).sum((0, 2, 3)), y.numel() // y.shape[1]))
        handles.append(modules[name].register_forward_pre_hook(hook))
    try:
        run_forward(probe)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for name, parts in stats.items():
        s1 = sum(p[0] for p in parts)
        s2 = sum(p[1] for p in parts)
        m = sum(p[2] for p in parts)
        mean = s1 / m
        out[name] = (mean, s2 / m - mean * mean)
    return out


@HOOKS.register_module()
class CBNStatsProbeHook(Hook):
    """Every ``interval`` iterations, compare the BN / plain-average / CBN estimates of each CBN
    layer with the window's large-batch truth (see module docstring).

    Args:
        interval: probe every this many iterations (after the burn-in; window > 1 layers only).
        layers: names of the CBN layers to probe (default: all).
        out_file: JSON-lines output, relative to the work dir.
    """

    priority = 'LOW'

    def __init__(self, interval: int = 50, layers=None, out_file: str = 'cbn_stats.jsonl'):
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f'CBNStatsProbeHook option `interval` must be an integer >= 1, '
                             f'got {interval!r}')
        self.interval, self.layers, self.out_file = interval, layers, out_file
        self._batches = deque()
        self._pending = None

    def _model(self, runner):
        return runner.model.module if is_model_wrapper(runner.model) else runner.model

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        model = self._model(runner)
        layers = {n: m for n, m in model.named_modules()
                  if isinstance(m, CrossIterationBatchNorm2d) and m.window > 1
                  and (self.layers is None or n in self.layers)}
        if not layers:
            return
        window = max(m.window for m in layers.values())
        self._batches.append(data_batch)
        while len(self._batches) > window:
            self._batches.popleft()
        due = (runner.iter + 1) % self.interval == 0 and len(self._batches) == window
        if due and not any(m.in_burnin for m in layers.values()):
            for m in layers.values():
                m.probe = {}
            # the weights of iteration t, before the optimizer changes them
            self._pending = (copy.deepcopy(model), layers, list(self._batches))

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        if self._pending is None:
            return
        snapshot, layers, batches = self._pending
        self._pending = None
        estimates = {n: m.probe for n, m in layers.items() if m.probe}
        for m in layers.values():
            m.probe = None
        merged = {k: sum((b[k] for b in batches), []) if isinstance(batches[0][k], list)
                  else torch.cat([b[k] for b in batches]) for k in batches[0]}

        def run_forward(model):
            data = model.data_preprocessor(merged, True)
            model(**data, mode='loss')
        truth = large_batch_statistics(snapshot, list(estimates), run_forward)
        record = dict(iter=runner.iter, layers={})
        for name, est in estimates.items():
            if name not in truth:
                continue
            tm, tv = truth[name]
            record['layers'][name] = {
                kind: dict(zip(('mean_err', 'var_err'),
                               estimate_errors(est[kind][0].double(), est[kind][1].double(), tm, tv)))
                for kind in ('batch', 'plain', 'cbn')}
        with open(osp.join(runner.work_dir, self.out_file), 'a') as f:
            f.write(json.dumps(record) + '\n')
