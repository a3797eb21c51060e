"""Synchronized Cross-Iteration BN: each iteration's statistics over all processes."""
from typing import Optional

import torch
import torch.distributed as dist

from .functional import derivatives
from .layer import CrossIterationBatchNorm2d
from .options import reject_unknown


class SyncCrossIterationBatchNorm2d(CrossIterationBatchNorm2d):
    """CBN whose per-iteration moments and weight derivatives are averaged over the processes of
    ``process_group`` (weighted by each process's element count, so unequal and empty per-process
    batches are right), then pooled over the window identically on every process.

    Without an initialized process group of 2+ processes it is exactly
    :class:`CrossIterationBatchNorm2d`. During burn-in (and with ``window=1``) it is SyncBN.
    Every process must call the layer the same number of times per step, as with SyncBN.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, window: int = 4,
                 burnin: Optional[int] = None, compensate: bool = True, process_group=None, device=None,
                 dtype=None, **unknown):
        reject_unknown(type(self), unknown)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, window,
                         burnin, compensate, device, dtype)
        self.process_group = process_group

    def _collective(self) -> bool:
        return (dist.is_available() and dist.is_initialized()
                and dist.get_world_size(self.process_group) > 1)

    def _moments(self, y, rec, w, kern):
        """All-reduce of the sums behind (mu, nu, d mu/dW, d nu/dW) and the element count."""
        if not self._collective():
            return super()._moments(y, rec, w, kern)
        m = y.numel() // self.num_features
        moments = kern.moments(y)
        parts = [moments.new_full((1,), float(m)), (moments * m).view(-1)]
        if w is not None:
            derivs = derivatives(rec, y, normalize=False)
            parts.append(derivs.view(-1))
        flat = torch.cat(parts)
        dist.all_reduce(flat, group=self.process_group)
        total = flat[0]
        # every process empty: zeros, kept out of the window and the running statistics (the
        # layer treats a zero total count like a non-finite batch)
        flat = flat[1:] / total.clamp_min(1)
        moments = flat[:moments.numel()].view_as(moments)
        if w is not None:
            derivs = flat[moments.numel():].view_as(derivs)
        return moments, derivs if w is not None else None, total

    def _recomputed_derivatives(self, rec, y, m):
        """The deferred derivatives (activation checkpointing), averaged over the processes like
        those of :meth:`_moments`; every process recomputes the layer in its backward."""
        if not self._collective():
            return super()._recomputed_derivatives(rec, y, m)
        derivs = derivatives(rec, y, normalize=False)
        dist.all_reduce(derivs, group=self.process_group)
        return derivs / m.clamp_min(1)

    def _grad_reducer(self):
        if not self._collective():
            return None
        group = self.process_group

        def all_reduce(sum_dy, sum_dy_xmu):
            flat = torch.cat([sum_dy, sum_dy_xmu])
            dist.all_reduce(flat, group=group)
            return flat[:sum_dy.numel()], flat[sum_dy.numel():]
        return all_reduce
