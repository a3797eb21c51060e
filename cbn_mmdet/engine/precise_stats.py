"""Precise population statistics for BatchNorm-family layers (BN, SyncBN, CBN, SyncCBN).

Running statistics are an EMA of noisy per-iteration statistics taken while the weights moved;
at 1-2 images per GPU they can be far from the population statistics of the final weights.
With the weights fixed, :func:`recompute_precise_stats` runs training images through the model
in train mode under ``torch.no_grad()`` and sets every trained BN-family layer's
``running_mean`` / ``running_var`` to the population estimate: element-count weighted, variance
from pooled sums (not an average of per-batch variances), unbiased as BN's ``running_var`` is,
summed over processes in DDP. Each layer normalizes with its batch statistics during the pass
(CBN runs as plain BN: window, step counter and burn-in are left as they were).
"""
import random
import time
from typing import Callable, Iterable, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def check_num_images(num_images) -> int:
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
        raise ValueError('PreciseStatsHook option `num_images` must be an integer >= 1, '
                         f'got {num_images!r}')
    return num_images


def trained_bn_layers(model: nn.Module) -> List[Tuple[str, _BatchNorm]]:
    """BN-family layers that train their statistics: in train mode after ``model.train()``
    (so not under ``norm_eval`` or in frozen stages) and tracking running statistics."""
    modes = [(m, m.training) for m in model.modules()]
    model.train()
    layers = [(n, m) for n, m in model.named_modules()
              if isinstance(m, _BatchNorm) and m.training and m.track_running_stats]
    for m, mode in modes:
        m.training = mode
    return layers


class _Accumulator:
    """Float64 per-channel sums of x and x^2 and the element count of one layer's inputs."""

    def __init__(self, layer: _BatchNorm):
        c = layer.num_features
        self.sums = torch.zeros(2, c, dtype=torch.float64, device=layer.running_mean.device)
        self.count = 0

    def plain_bn_forward(self, layer: _BatchNorm) -> Callable:
        """``layer``'s forward for the pass: accumulate its input, normalize as BN in training."""
        def plain_bn(y):
            if y.numel() > 0:
                y64 = y.detach().to(torch.float64)
                dims = [0] + list(range(2, y.dim()))
                self.sums[0] += y64.sum(dims)
                self.sums[1] += (y64 * y64).sum(dims)
                self.count += y.numel() // y.shape[1]
            # batch statistics, no running update: what BN does in training, minus its state
            return F.batch_norm(y, None, None, layer.weight, layer.bias, True, 0.0, layer.eps)
        return plain_bn


def _rng_states():
    return random.getstate(), np.random.get_state(), torch.get_rng_state(), \
        torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None


def _set_rng_states(states):
    random.setstate(states[0])
    np.random.set_state(states[1])
    torch.set_rng_state(states[2])
    if states[3] is not None:
        torch.cuda.set_rng_state_all(states[3])


@torch.no_grad()
def recompute_precise_stats(model: nn.Module, batches: Iterable, forward: Callable,
                            num_images: int, images_in: Callable = len,
                            progress: Optional[Callable] = None) -> dict:
    """Set the running statistics of ``model``'s trained BN-family layers to their population
    estimate over ``num_images`` images (per process) from ``batches``.

    ``forward(model, batch)`` runs one batch in training mode; ``images_in(batch)`` counts its
    images; ``progress(n)`` is told the images done. Model mode, RNG states and every other
    buffer are restored. Returns ``{'layers', 'images', 'seconds'}`` (images: this process).
    """
    check_num_images(num_images)
    start = time.perf_counter()
    modes = [(m, m.training) for m in model.modules()]  # restored exactly afterwards
    layers = trained_bn_layers(model)
    rng = _rng_states()
    accs = {}
    for _, m in layers:
        accs[m] = _Accumulator(m)
        m.forward = accs[m].plain_bn_forward(m)  # instance attribute: shadows the class's
    images = 0
    try:
        model.train()
        for batch in batches:
            if images >= num_images:
                break
            forward(model, batch)
            images += images_in(batch)
            if progress is not None:
                progress(images)
    finally:
        for _, m in layers:
            del m.forward
        for m, mode in modes:
            m.training = mode
        _set_rng_states(rng)
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if layers:
        flat = torch.cat([torch.cat([accs[m].sums.view(-1), accs[m].sums.new_tensor([accs[m].count])])
                          for _, m in layers])
        if world > 1:
            dist.all_reduce(flat)
        offset = 0
        for _, m in layers:
            c = m.num_features
            s1, s2, n = flat[offset:offset + c], flat[offset + c:offset + 2 * c], flat[offset + 2 * c]
            offset += 2 * c + 1
            if n < 2:
                continue  # no estimate: keep the running statistics
            mean = s1 / n
            var = (s2 - n * mean * mean).clamp_min(0) / (n - 1)
            m.running_mean.copy_(mean.to(m.running_mean.dtype))
            m.running_var.copy_(var.to(m.running_var.dtype))
    return dict(layers=len(layers), images=images, seconds=time.perf_counter() - start)


def _detector_forward(model, batch):
    """An mmdet/mmengine model's training-mode forward of one dataloader batch (losses
    discarded): the same inputs and sampled RoIs the heads' norms see in training."""
    data = model.data_preprocessor(batch, True)
    model._run_forward(data, mode='loss')


def _images_in(batch) -> int:
    samples = batch.get('data_samples') if isinstance(batch, dict) else None
    if samples is not None:
        return len(samples)
    inputs = batch['inputs'] if isinstance(batch, dict) else batch
    return len(inputs)


def precise_stats_for_runner(runner, num_images: int) -> dict:
    """:func:`recompute_precise_stats` over ``runner``'s train dataloader, with mmengine's
    progress bar on the main process and the cost logged."""
    from mmengine.dist import is_main_process
    from mmengine.model import is_model_wrapper
    from mmengine.utils import ProgressBar
    model = runner.model.module if is_model_wrapper(runner.model) else runner.model
    bar = ProgressBar(num_images) if is_main_process() else None
    done = [0]

    def progress(n):
        if bar is not None:
            for _ in range(min(n, num_images) - done[0]):
                bar.update()
            done[0] = min(n, num_images)
    info = recompute_precise_stats(model, runner.train_dataloader, _detector_forward, num_images,
                                   _images_in, progress)
    if bar is not None:
        bar.file.write('\n')
    runner.logger.info(
        f"PreciseStatsHook: population statistics of {info['layers']} BatchNorm-family layers "
        f"from {info['images']} training images per process x {runner.world_size} processes in "
        f"{info['seconds']:.1f} s (iteration {runner.iter})")
    return info


try:
    from mmengine.hooks import Hook
    from mmengine.registry import HOOKS
except ImportError:  # the layer and recompute_precise_stats need only torch
    Hook = None

if Hook is not None:
    @HOOKS.register_module()
    class PreciseStatsHook(Hook):
        """Precise BN statistics before each validation and after the last training epoch (so
        the last checkpoint holds them): ``custom_hooks = [dict(type='PreciseStatsHook')]``.

        Args:
            num_images: training images per process run through the model (default 1000; in
                DDP every process runs this many and the sums are all-reduced).
        """

        priority = 'ABOVE_NORMAL'  # before CheckpointHook (VERY_LOW) writes the last epoch

        def __init__(self, num_images: int = 1000):
            self.num_images = check_num_images(num_images)
            self._done_at = None  # the iteration whose weights the statistics belong to

        def _recompute(self, runner):
            if self._done_at == runner.iter:
                return
            precise_stats_for_runner(runner, self.num_images)
            self._done_at = runner.iter

        def after_train_epoch(self, runner) -> None:
            if runner.epoch + 1 >= runner.max_epochs:  # the last epoch's checkpoint gets them
                self._recompute(runner)

        def before_val(self, runner) -> None:
            loop = getattr(runner, '_train_loop', None)
            if loop is not None and not isinstance(loop, dict):  # validation during training
                self._recompute(runner)
