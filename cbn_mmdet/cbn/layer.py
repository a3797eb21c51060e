"""Cross-Iteration Batch Normalization as a drop-in ``_BatchNorm`` subclass."""
import numbers
import warnings
import weakref
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from .conv_trace import find_producing_conv
from .functional import (CountNormalize, aggregate, batch_moments, project, stats_dtype,
                         weight_derivatives, window_sums)

# Window state saved in the state_dict next to BN's own buffers. Shapes depend on the producing
# conv, so they start empty and are sized on first use (and on load).
#   cbn_mu, cbn_nu        (S, E, C)  moments of the stored iterations (S streams, E = window - 1)
#   cbn_wmu, cbn_wnu      (S, E, C)  <d mu/dW, W_s>, <d nu/dW, W_s>: the weight snapshot W_s as
#                                    the compensation uses it
#   cbn_dmu               (S, G, E, K)  d mu/dW per conv group (K = C_in/groups * kh * kw)
#   cbn_dnu               (S, C, E, K)  d nu/dW per channel
#   cbn_valid             (S, E)     1 where a slot holds an iteration
#   cbn_head              (S,)       next slot to overwrite (the oldest)
#   cbn_step              ()         training steps seen (drives the burn-in)
#   cbn_skipped           ()         batches with non-finite statistics kept out of the window
WINDOW_BUFFERS = ('cbn_mu', 'cbn_nu', 'cbn_wmu', 'cbn_wnu', 'cbn_dmu', 'cbn_dnu', 'cbn_valid',
                  'cbn_head')
STATE_BUFFERS = WINDOW_BUFFERS + ('cbn_step', 'cbn_skipped')
# More calls than this in one step (no backward, no update in between) are taken as new steps.
MAX_CALLS_PER_STEP = 16


def _check_int(name, value, low):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f'CBN option `{name}` must be an integer >= {low}, got {value!r}')
    return int(value)


def _check_bool(name, value):
    if not isinstance(value, bool):
        raise ValueError(f'CBN option `{name}` must be True or False, got {value!r}')
    return value


class CrossIterationBatchNorm2d(_BatchNorm):
    """Cross-Iteration Batch Normalization (Yao et al., arXiv 2002.05712) for (N, C, H, W) inputs.

    Pools the statistics of the last ``window`` training iterations, correcting the stored ones
    to the current weights of the conv that produced the input (found from the input's autograd
    graph, no extra wiring) with a first-order Taylor term. Eval mode is exactly BatchNorm2d.

    Args:
        num_features: channels C.
        eps, momentum, affine, track_running_stats: as ``nn.BatchNorm2d``.
        window: iterations pooled, the current one included (k). 1 is BatchNorm2d.
        burnin: training iterations run as plain BatchNorm2d before the window is used.
        compensate: correct stored statistics for the weight change (False: plain averaging).
    """

    _abbr_ = 'bn'

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, window: int = 4,
                 burnin: int = 0, compensate: bool = True, device=None, dtype=None):
        num_features = _check_int('num_features', num_features, 1)
        if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not eps > 0:
            raise ValueError(f'CBN option `eps` must be a float > 0, got {eps!r}')
        if momentum is not None and (isinstance(momentum, bool) or not isinstance(momentum, numbers.Real)
                                     or not 0.0 <= momentum <= 1.0):
            raise ValueError(f'CBN option `momentum` must be None or a float in [0, 1], got {momentum!r}')
        super().__init__(num_features, float(eps), momentum, _check_bool('affine', affine),
                         _check_bool('track_running_stats', track_running_stats), device, dtype)
        self.window = _check_int('window', window, 1)
        self.burnin = _check_int('burnin', burnin, 0)
        self.compensate = _check_bool('compensate', compensate)
        float_kw = dict(device=device, dtype=dtype or torch.get_default_dtype())
        for name in ('cbn_mu', 'cbn_nu', 'cbn_wmu', 'cbn_wnu', 'cbn_dmu', 'cbn_dnu', 'cbn_valid'):
            self.register_buffer(name, torch.zeros(0, **float_kw))
        self.register_buffer('cbn_head', torch.zeros(0, dtype=torch.long, device=device))
        self.register_buffer('cbn_step', torch.zeros((), dtype=torch.long, device=device))
        self.register_buffer('cbn_skipped', torch.zeros((), dtype=torch.long, device=device))
        self.layer_name: Optional[str] = None  # set by cbn_mmdet.name_cbn_layers, used in warnings
        self.probe: Optional[dict] = None  # a dict to fill with this step's estimates (studies)
        self._reset_host_state()

    def extra_repr(self):
        return (super().extra_repr() +
                f', window={self.window}, burnin={self.burnin}, compensate={self.compensate}')

    def _check_input_dim(self, input):
        if input.dim() != 4:
            raise ValueError(f'{type(self).__name__} expects a 4-d (N, C, H, W) input, got {input.dim()}-d')

    # ------------------------------------------------------------------ host-side bookkeeping
    def _reset_host_state(self):
        self._step = int(self.cbn_step)            # mirrors cbn_step without device syncs
        self._heads: List[int] = [int(h) for h in self.cbn_head.tolist()]
        self._calls = 0                            # calls so far in the current step
        self._backward_seen = True                 # a backward ran since the last call
        self._signature = None                     # parameter versions at the last call
        self._replay: list = []                    # per call of this step, for recomputation
        self._warned = False

    def reset_window(self):
        """Forget the stored iterations (the step counter and running statistics are kept)."""
        for name in WINDOW_BUFFERS:
            buf = getattr(self, name)
            setattr(self, name, buf.new_zeros(0))
        self._heads = []

    @property
    def in_burnin(self) -> bool:
        return self._step < self.burnin

    def _name(self):
        return self.layer_name or f'{type(self).__name__}({self.num_features}) at {id(self):#x}'

    def _begin_call(self, y: Tensor, conv_weight: Optional[Tensor]) -> int:
        """Advance the step if a new training step started; return this call's stream index.

        A new step starts when a backward pass has reached this layer since its last call, when
        a parameter it can see (its conv's weight, its own affine parameters) changed since then,
        or on every call when no gradient can flow. Further calls in the same step (a head shared
        across FPN levels) get their own streams: the i-th call of a step pools with the i-th
        calls of earlier steps, never with other calls of the same step.
        """
        params = [p for p in (conv_weight, self.weight, self.bias) if p is not None and p.requires_grad]
        signature = tuple(p._version for p in params)
        grads_flow = torch.is_grad_enabled() and (y.requires_grad or bool(params))
        if self._calls >= MAX_CALLS_PER_STEP and not self._backward_seen:
            warnings.warn(f'{self._name()} was called {self._calls} times in training mode with '
                          'no backward pass or parameter update in between; treating each further '
                          'call as a new training step. Call backward() per step, or run such '
                          'passes under torch.no_grad().')
            self._backward_seen = True
        if self._backward_seen or signature != self._signature or not grads_flow:
            self._step += 1
            self.cbn_step.fill_(self._step)
            self._calls = 0
            self._replay = []
            self._backward_seen = False
        self._signature = signature
        self._calls += 1
        return self._calls - 1

    def _watch_backward(self, out: Tensor):
        if out.requires_grad:
            ref = weakref.ref(self)

            def _seen(_grad):
                mod = ref()
                if mod is not None:
                    mod._backward_seen = True
            out.register_hook(_seen)

    # ------------------------------------------------------------------ window storage
    def _ensure_stream(self, stream: int, c: int, dtype, device):
        """Grow the window buffers (zero-filled) so that ``stream`` has its slots."""
        have = self.cbn_mu.shape[0] if self.cbn_mu.dim() == 3 else 0
        grow = stream + 1 - have
        if grow <= 0:
            return
        e = self.window - 1

        def grown(buf, tail, dt=dtype):
            new = torch.zeros((grow,) + tuple(tail), dtype=dt, device=device)
            return torch.cat([buf, new]) if have else new
        for name in ('cbn_mu', 'cbn_nu', 'cbn_wmu', 'cbn_wnu'):
            setattr(self, name, grown(getattr(self, name), (e, c)))
        self.cbn_valid = grown(self.cbn_valid, (e,))
        self.cbn_head = grown(self.cbn_head, (), torch.long)
        if self.cbn_dnu.dim() == 4:
            self.cbn_dmu = grown(self.cbn_dmu, self.cbn_dmu.shape[1:])
            self.cbn_dnu = grown(self.cbn_dnu, self.cbn_dnu.shape[1:])
        self._heads += [0] * grow

    def _ensure_derivatives(self, groups: int, k: int):
        s, e, c = self.cbn_mu.shape
        if self.cbn_dnu.dim() == 4 and self.cbn_dnu.shape[-1] == k and self.cbn_dmu.shape[1] == groups:
            return
        if self.cbn_dnu.dim() == 4:
            raise RuntimeError(f'{self._name()}: the producing conv changed shape '
                               f'(stored K={self.cbn_dnu.shape[-1]}, now {k}); call reset_window()')
        kw = dict(dtype=self.cbn_mu.dtype, device=self.cbn_mu.device)
        self.cbn_dmu = torch.zeros(s, groups, e, k, **kw)
        self.cbn_dnu = torch.zeros(s, c, e, k, **kw)

    def _window_sums(self, stream: int, w: Optional[Tensor]):
        """Sums of this stream's stored moments, compensated to the current weight ``w``."""
        if self.cbn_mu.dim() != 3 or stream >= self.cbn_mu.shape[0]:
            return None
        mu, nu = self.cbn_mu[stream], self.cbn_nu[stream]
        if w is not None and self.cbn_dnu.dim() == 4 and self.cbn_dnu.shape[-1] == w.shape[1]:
            pmu, pnu = project(self.cbn_dmu[stream], self.cbn_dnu[stream], w)
            mu = mu + (pmu - self.cbn_wmu[stream])
            nu = nu + (pnu - self.cbn_wnu[stream])
        return window_sums(mu, nu, self.cbn_valid[stream])

    def _push_stats(self, stream, mu, nu, ok) -> int:
        """Store this iteration's moments in the stream's oldest slot. The slot counts only when
        they are finite (``ok``): a non-finite batch drops the oldest entry, never enters."""
        h = self._heads[stream]
        self.cbn_mu[stream, h].copy_(mu)
        self.cbn_nu[stream, h].copy_(nu)
        self.cbn_valid[stream, h].copy_(ok)
        self._heads[stream] = (h + 1) % (self.window - 1)
        self.cbn_head[stream] = self._heads[stream]
        return h

    def _store_derivatives(self, stream, h, derivs, w):
        """Store d mu/dW, d nu/dW and their projections on the weight in slot ``h``; zeros when
        ``derivs`` is None (the slot is then averaged without compensation)."""
        if derivs is None:
            if self.cbn_dnu.dim() == 4:
                for buf in (self.cbn_dmu[stream, :, h], self.cbn_dnu[stream, :, h],
                            self.cbn_wmu[stream, h], self.cbn_wnu[stream, h]):
                    buf.zero_()
            return
        dmu, dnu = derivs
        self._ensure_derivatives(dmu.shape[0], dmu.shape[1])
        wmu, wnu = project(dmu.unsqueeze(1), dnu.unsqueeze(1), w)
        self.cbn_dmu[stream, :, h].copy_(dmu)
        self.cbn_dnu[stream, :, h].copy_(dnu)
        self.cbn_wmu[stream, h].copy_(wmu[0])
        self.cbn_wnu[stream, h].copy_(wnu[0])

    # ------------------------------------------------------------------ forward
    def forward(self, y: Tensor) -> Tensor:
        self._check_input_dim(y)
        if not self.training:
            return super().forward(y)  # running statistics: exactly BatchNorm2d
        collective = self._collective()
        if y.numel() == 0 and not collective:
            return self._empty(y)
        if torch._C._current_graph_task_id() != -1:
            return self._recompute(y)  # activation checkpointing reruns the forward in backward
        rec, why = find_producing_conv(y)
        stream = self._begin_call(y, rec.weight if rec is not None else None)
        use_window = self.window > 1 and self._step - 1 >= self.burnin
        if not use_window and not collective:
            self._replay.append(None)
            out = super().forward(y)  # burn-in and window=1: BatchNorm2d exactly
            self._watch_backward(out)
            return out
        return self._cbn_forward(y, stream if use_window else None, rec, why)

    # Hooks for SyncCBN: batch statistics over all processes, and the matching backward.
    def _collective(self) -> bool:
        return False

    def _moments(self, y: Tensor, rec, w):
        """This iteration's (mu, nu), their weight derivatives (or None) and element count."""
        return (*batch_moments(y), weight_derivatives(rec, y) if w is not None else None,
                y.numel() // self.num_features)

    def _grad_reducer(self):
        return None

    def _compensation_weight(self, rec):
        """The current conv weight as (C, K) when this call can compensate, else None."""
        if not (self.compensate and rec is not None and rec.weight is not None):
            return None
        if torch._C._autograd._top_saved_tensors_default_hooks(False) is not None:
            # Under saved-tensor hooks (activation checkpointing) reading the conv's saved input
            # would trigger its recomputation or break the checkpoint.
            if not self._warned:
                self._warned = True
                warnings.warn(f'{self._name()} runs under saved-tensor hooks (activation '
                              'checkpointing); stored statistics are averaged without weight '
                              'compensation there.')
            return None
        return rec.weight.detach().reshape(self.num_features, -1)

    def _cbn_forward(self, y, stream, rec, why):
        """Window forward; ``stream`` None means no window (SyncCBN's burn-in: synchronized BN)."""
        if rec is None and why != 'no-graph' and not self._warned:
            self._warned = True
            warnings.warn(f'{self._name()}: its input comes from {why}, not from a 2-d conv; '
                          'stored statistics are averaged without weight compensation.')
        w = self._compensation_weight(rec) if stream is not None else None
        with torch.no_grad():
            mu, nu, derivs, m = self._moments(y, rec, w)
            sums = None
            if stream is not None:
                self._ensure_stream(stream, self.num_features, mu.dtype, mu.device)
                sums = self._window_sums(stream, w)
            mean, var, n = aggregate(mu, nu, sums)
            invstd = (var + self.eps).rsqrt()
            count = n.to(torch.float64) * m
            self._replay.append(sums)
            if self.probe is not None and stream == 0:
                self._record_probe(mu, nu, mean, var, stream if sums is not None else None)
            ok = torch.isfinite(mu).all() & torch.isfinite(nu).all()
            self.cbn_skipped.add_((~ok).long())
            if stream is not None:
                h = self._push_stats(stream, mu, nu, ok)
                self._store_derivatives(stream, h, derivs, w)
            self._update_running(mean, var, count, ok)
        out = CountNormalize.apply(y, self.weight, self.bias, mean, invstd, count,
                                   self._grad_reducer())
        self._watch_backward(out)
        return out

    def _record_probe(self, mu, nu, mean, var, stream):
        """For statistics studies: the mean/var that BN (this batch), plain averaging of the
        window and CBN would normalize with at this call (before this batch is stored)."""
        plain = aggregate(mu, nu, self._window_sums(stream, None) if stream is not None else None)
        self.probe.update(
            batch=(mu.clone(), (nu - mu * mu).clamp_min(0)), plain=(plain[0].clone(), plain[1].clone()),
            cbn=(mean.clone(), var.clone()), step=self._step)

    def _update_running(self, mean, var, count, ok):
        """Running statistics follow the window's mean and (unbiased) variance: the statistics the
        layer normalized with in training, so eval sees what training saw."""
        if not self.track_running_stats:
            return
        self.num_batches_tracked.add_(1)
        factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        unbiased = var * (count / (count - 1).clamp_min(1))
        for buf, new in ((self.running_mean, mean), (self.running_var, unbiased)):
            buf.copy_(torch.where(ok, torch.lerp(buf, new.to(buf.dtype), factor), buf))

    def _empty(self, y):
        """No positions (e.g. a mask head with no positive RoI): no statistics, no state change;
        the affine parameters stay in the graph (zero gradient) so DDP sees them used."""
        zeros = y.new_zeros(self.num_features, dtype=stats_dtype(y.dtype))
        return F.batch_norm(y, zeros, torch.ones_like(zeros), self.weight, self.bias, False, 0.0, self.eps)

    def _recompute(self, y):
        """Rerun of this step's call by activation checkpointing: same statistics, no state change."""
        if len(self._replay) != 1:
            raise RuntimeError(
                f'{self._name()} is being recomputed (activation checkpointing) but was called '
                f'{len(self._replay)} times in this step; CBN supports checkpointing of layers '
                'called once per step.')
        sums = self._replay[0]
        if sums is None and not self._collective():  # a BN step: batch statistics only
            out = F.batch_norm(y, None, None, self.weight, self.bias, True, 0.0, self.eps)
        else:
            with torch.no_grad():
                mu, nu, _, m = self._moments(y, None, None)
                mean, var, n = aggregate(mu, nu, sums)
                invstd = (var + self.eps).rsqrt()
                count = n.to(torch.float64) * m
            out = CountNormalize.apply(y, self.weight, self.bias, mean, invstd, count,
                                       self._grad_reducer())
        self._watch_backward(out)
        return out

    # ------------------------------------------------------------------ state
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        present = [n for n in STATE_BUFFERS if prefix + n in state_dict]
        for name in present:
            src, cur = state_dict[prefix + name], getattr(self, name)
            if src.shape != cur.shape:
                setattr(self, name, torch.zeros(src.shape, dtype=cur.dtype, device=cur.device))
        if not any(prefix + n in state_dict for n in WINDOW_BUFFERS):
            self.reset_window()  # a plain BN checkpoint: start with an empty window
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        ours = {prefix + n for n in STATE_BUFFERS}
        missing_keys[:] = [k for k in missing_keys if k not in ours]
        self._reset_host_state()
