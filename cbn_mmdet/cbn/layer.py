"""Cross-Iteration Batch Normalization as a drop-in ``_BatchNorm`` subclass."""
import weakref
from typing import NamedTuple, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from . import compat, kernels
from .conv_trace import find_producing_conv
from .functional import CountNormalize, derivatives, no_autocast, non_finite, pool, window_factors
from .kernels import stats_dtype
from .options import check_bool, check_eps, check_int, check_momentum, reject_unknown
from .steps import StepTracker
from .window import (BUFFERS, SAVED_BUFFERS, RingWindow, adapt_state, apply_to_window, init_window,
                     saved_state)
from .warn import warn

# The window's keys in a saved window (window.py) and in state_dicts of layout version < 3.
WINDOW_KEYS = SAVED_BUFFERS + ('cbn_valid', 'cbn_head')
COUNTERS = ('cbn_step', 'cbn_skipped')  # in the state_dict next to BN's own buffers


_LAYERS: 'weakref.WeakSet' = weakref.WeakSet()  # every layer built, for the burn-in warning
_warned_no_burnin = False


def _warn_no_burnin(layer) -> None:
    """Once per process: layers start their window with no burn-in (none given, no CBNHook)."""
    global _warned_no_burnin
    _warned_no_burnin = True
    n = sum(1 for m in _LAYERS if m.window > 1 and not (m.burnin_given or m.configured_by_hook))
    warn(
        f'{n} CBN layers (first: {layer._name()}) start their window at training step '
        f'{layer._step} with no burn-in: no `burnin` was given and no CBNHook is in the run. The '
        'paper trains as plain BN first (window started at full learning rate: box mAP 0.271 -> '
        "0.112 in docs/studies.md, study 5). Add custom_hooks=[dict(type='CBNHook', "
        "burnin_epochs='first_lr_step')] to the config, or give the layers `burnin` "
        '(burnin=0 to start at once without this warning).')


class _Deferred(NamedTuple):
    """An iteration stored without its derivatives, which the recomputation of activation
    checkpointing supplies (:meth:`CrossIterationBatchNorm2d._complete`)."""
    step: int
    stream: int
    slot: int
    m: object          # element count (SyncCBN: the 0-d total over processes)
    under_hooks: bool  # deferred because of saved-tensor hooks (else: no autograd graph)


def _row(buf: Tensor, i: int) -> Tensor:
    return buf[:, :, i] if buf.dim() == 4 else buf


class CrossIterationBatchNorm2d(_BatchNorm):
    """Cross-Iteration Batch Normalization (Yao et al., arXiv 2002.05712) for (N, C, H, W) inputs.

    Pools the statistics of the last ``window`` training iterations, correcting the stored ones
    to the current weights of the conv that produced the input (found from the input's autograd
    graph, no extra wiring) with a first-order Taylor term. Eval mode is exactly BatchNorm2d.

    Args:
        num_features: channels C.
        eps, momentum, affine, track_running_stats: as ``nn.BatchNorm2d``.
        window: iterations pooled, the current one included (k). 1 is BatchNorm2d.
        burnin: training iterations run as plain BatchNorm2d before the window is used. None
            (default): 0, to be set by ``CBNHook``; a layer that starts its window with neither
            warns once per process (the paper's recipe has a burn-in).
        compensate: correct stored statistics for the weight change (False: plain averaging).
    """

    _abbr_ = 'bn'
    # state_dict layout: 3 = BN's buffers and the two counters (the window is saved apart, see
    # window_state); 2 and earlier (CBN) also held the window; BN's own layouts are 2 and None.
    _version = 3

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, window: int = 4,
                 burnin: Optional[int] = None, compensate: bool = True, device=None, dtype=None,
                 **unknown):
        reject_unknown(type(self), unknown)
        super().__init__(check_int('num_features', num_features, 1), check_eps(eps),
                         check_momentum(momentum), check_bool('affine', affine),
                         check_bool('track_running_stats', track_running_stats), device, dtype)
        self.window = check_int('window', window, 1)
        self._burnin = 0 if burnin is None else check_int('burnin', burnin, 0)
        self.burnin_given = burnin is not None
        self.configured_by_hook = False  # CBNHook sets the burn-in and drives the steps
        self.compensate = check_bool('compensate', compensate)
        init_window(self, device, dtype or torch.get_default_dtype())
        self.register_buffer('cbn_step', torch.zeros((), dtype=torch.long, device=device))
        self.register_buffer('cbn_skipped', torch.zeros((), dtype=torch.long, device=device))
        self.layer_name: Optional[str] = None  # set by cbn_mmdet.name_cbn_layers, used in warnings
        self.probe: Optional[dict] = None  # a dict to fill with this step's estimates (studies)
        self._reset_host_state()
        _LAYERS.add(self)
        compat.ensure_tracker()  # torch < 2.8: count saved-tensor hooks from now on (checkpointing)

    def extra_repr(self):
        return (super().extra_repr() +
                f', window={self.window}, burnin={self.burnin}, compensate={self.compensate}')

    def _check_input_dim(self, input):
        if input.dim() != 4:
            raise ValueError(f'{type(self).__name__} expects a 4-d (N, C, H, W) input, got {input.dim()}-d')

    # Read-only (S, E, C) views in the layout of earlier versions, for inspection.
    cbn_mu = property(lambda self: _row(self.cbn_moments, 0))
    cbn_nu = property(lambda self: _row(self.cbn_moments, 1))
    cbn_wmu = property(lambda self: _row(self.cbn_proj, 0))
    cbn_wnu = property(lambda self: _row(self.cbn_proj, 1))
    cbn_dnu = property(lambda self: self.cbn_deriv[:, :self.num_features] if self.cbn_deriv.dim() == 4 else self.cbn_deriv)
    cbn_dmu = property(lambda self: self.cbn_deriv[:, self.num_features:] if self.cbn_deriv.dim() == 4 else self.cbn_deriv)

    # ------------------------------------------------------------------ host-side bookkeeping
    def _reset_host_state(self):
        self.steps = StepTracker(int(self.cbn_step), self._name, self.configured_by_hook)  # mirrors cbn_step
        self._tracked = int(self.num_batches_tracked) if self.track_running_stats else 0
        self.ring = RingWindow(self)
        self._warned = False
        self._pending: Optional[_Deferred] = None
        self._warned_pending = False
        self._conv_weight = None  # weakref to the trainable weight of the producing conv
        self._work: dict = {}                      # scratch tensors, see _scratch

    @property
    def _step(self) -> int:
        """Training steps begun so far (host copy of ``cbn_step``)."""
        return self.steps.step

    def reset_window(self):
        """Forget the stored iterations (the step counter and running statistics are kept)."""
        self.ring.clear()

    def start_new_run(self):
        """A new training run from these weights (fine-tuning): empty window, step 0, so the
        run's burn-in comes first; weights and running statistics are kept."""
        self.ring.clear()
        self.cbn_step.zero_()
        self.cbn_skipped.zero_()
        self._reset_host_state()

    def drive_steps_by_runner(self):
        """Configured by ``CBNHook``: training steps begin at :meth:`StepTracker.new_iteration`
        (the hook calls it per runner iteration) instead of being inferred from the layer's
        calls, and the burn-in is the hook's (no missing-burn-in warning)."""
        self.configured_by_hook = True
        self.steps.driven = True

    @property
    def burnin(self) -> int:
        return self._burnin

    @burnin.setter
    def burnin(self, value: int):
        self._burnin = check_int('burnin', value, 0)
        self.burnin_given = True

    @property
    def in_burnin(self) -> bool:
        return self._step < self._burnin

    def _name(self):
        return self.layer_name or f'{type(self).__name__}({self.num_features}) at {id(self):#x}'

    def _begin_call(self, y: Tensor, conv_weight: Optional[Tensor]) -> int:
        """Account for a training call (:class:`StepTracker`); return its stream index."""
        if self.steps.begin_call(y, (conv_weight, self.weight, self.bias)):
            self.cbn_step.fill_(self.steps.step)
        return self.steps.stream

    # ------------------------------------------------------------------ forward
    def forward(self, y: Tensor) -> Tensor:
        if isinstance(y, fx.Proxy):
            # torch.fx symbolic tracing: one call of this module, as fx records nn.BatchNorm2d
            # (a leaf), so a GraphModule runs the layer in either mode and conv-BN passes
            # (mmengine's efficient_conv_bn_eval) find it.
            return y.tracer.create_proxy('call_module', y.tracer.path_of_module(self), (y,), {})
        if not self.training:
            return self._eval_forward(y)
        return self._train_forward(y)

    def _eval_forward(self, y: Tensor) -> Tensor:
        """Eval mode: running statistics, exactly BatchNorm2d (one ``F.batch_norm``). Kept out of
        the compiler-disabled training forward so that torch.jit.trace, torch.export, the ONNX
        exporters and torch.compile trace it like BatchNorm2d."""
        return super().forward(y)

    # Host-side bookkeeping and autograd-graph inspection cannot be traced: torch.compile runs
    # the layer eagerly (one graph break per call) instead of recompiling it per layer shape.
    @torch.compiler.disable
    def _train_forward(self, y: Tensor) -> Tensor:
        self._check_input_dim(y)
        collective = self._collective()
        if y.numel() == 0 and not collective:
            return self._empty(y)
        if compat.in_backward_recompute():
            return self._recompute(y)  # activation checkpointing reruns the forward in backward
        rec, why = find_producing_conv(y)
        stream = self._begin_call(y, rec.weight if rec is not None else None)
        use_window = self.window > 1 and self._step - 1 >= self._burnin
        if use_window and not (_warned_no_burnin or self.burnin_given or self.configured_by_hook):
            _warn_no_burnin(self)
        if not use_window and not collective:
            self.steps.record(None)
            if self.track_running_stats:
                self._tracked += 1
            out = super().forward(y)  # burn-in and window=1: BatchNorm2d exactly
            self.steps.watch(out)
            return out
        return self._cbn_forward(y, stream if use_window else None, rec, why)

    # Hooks for SyncCBN: batch statistics over all processes, and the matching backward.
    def _collective(self) -> bool:
        return False

    def _moments(self, y: Tensor, rec, w, kern):
        """This iteration's (mu, nu) as (2, C), their weight derivatives (C + G, K) or None, and
        the element count ``m`` (an int; SyncCBN: a 0-d tensor, the total over processes)."""
        moments = kern.moments(y, out=self._scratch('moments', (2, self.num_features), y))
        derivs = None
        if w is not None:
            derivs = derivatives(rec, y)  # (rows, K): for this call only, like the window's copy
        return moments, derivs, y.numel() // self.num_features

    def _scratch(self, name: str, shape, like: Tensor) -> Tensor:
        """A per-layer work tensor reused across calls (its contents live for one call)."""
        key = (name, tuple(shape), stats_dtype(like.dtype), like.device)
        buf = self._work.get(key)
        if buf is None:
            buf = self._work[key] = torch.empty(shape, dtype=key[2], device=like.device)
        return buf

    def _grad_reducer(self):
        return None

    def _compensation_weight(self, rec, why):
        """``(w, deferred)``: the current conv weight as (C, K) when this call can compensate,
        else None; ``deferred`` when this iteration's derivatives must come from the
        recomputation of activation checkpointing (the conv's input is not readable now)."""
        if not self.compensate:
            return None, False
        if rec is not None and rec.weight is not None:
            self._conv_weight = weakref.ref(rec.weight)
            weight = rec.weight
            # Non-reentrant checkpointing: reading the conv's saved input would recompute it.
            deferred = compat.saved_tensors_hooks_active()
        elif why == 'no-graph':
            # Reentrant checkpointing runs the forward without a graph; the recomputation in
            # backward has one. The weight is the one this layer's conv had before.
            weight = self._conv_weight() if self._conv_weight is not None else None
            deferred = True
        else:
            return None, False
        w = None if weight is None else weight.detach().reshape(self.num_features, -1)
        return w, deferred

    def _warn_lost_derivatives(self):
        """A deferred iteration that no recomputation completed (saved-tensor hooks without
        checkpointing, e.g. ``save_on_cpu``): it is stored without compensation."""
        if self._warned_pending:
            return
        self._warned_pending = True
        warn(f'{self._name()} ran under saved-tensor hooks that did not recompute it '
             '(not activation checkpointing, e.g. save_on_cpu): the conv input cannot be '
             'read there, so such iterations are stored without weight compensation.')

    def _factors(self, nvalid, m, dtype, device):
        """``(row, int counts)`` of :func:`window_factors` for ``nvalid`` stored iterations."""
        slots = max(self.window - 1, 0)
        if not isinstance(m, Tensor):
            tab, counts = window_factors(m, slots, dtype, device)
            if isinstance(nvalid, Tensor):  # index on the device: no host sync
                return tab.index_select(0, nvalid.view(1))[0], counts
            return tab[nvalid], counts
        n = torch.as_tensor(nvalid, device=device).to(dtype) + 1   # SyncCBN: m is a tensor
        c = n * m
        row = torch.stack((1 / n, torch.ones_like(n), c / (c - 1).clamp_min(1), c))
        return row, c.to(torch.int32).view(1).expand(slots + 1)

    def _cbn_forward(self, y, stream, rec, why):
        """Window forward; ``stream`` None means no window (SyncCBN's burn-in: synchronized BN)."""
        if rec is None and why != 'no-graph' and not self._warned:
            self._warned = True
            fix = ''
            if why.startswith('Compiled'):  # the conv ran inside a torch.compile graph
                fix = (' (the conv was compiled by torch.compile: call cbn_mmdet.cbn.'
                       'keep_producing_convs_eager(model) before compiling; CBNHook does it when '
                       'mmengine compiles)')
            warn(f'{self._name()}: its input comes from {why}, not from a 2-d conv'
                 f'{fix}; stored statistics are averaged without weight compensation.')
        kern = kernels.select(y)
        w, deferred = self._compensation_weight(rec, why) if stream is not None else (None, False)
        if self._pending is not None:  # not completed by a recomputation
            if self._pending.under_hooks:
                self._warn_lost_derivatives()
            self._pending = None
        with torch.no_grad(), no_autocast(y.device.type):
            moments, derivs, m = self._moments(y, rec, None if deferred else w, kern)
            proj = None
            if stream is None:
                nvalid = 0
                row, int_counts = self._factors(0, m, moments.dtype, moments.device)
                stats = moments.clone()
                stats[1].addcmul_(stats[0], stats[0], value=-1).clamp_min_(0)
            else:
                self.ring.ensure(stream, self.num_features, moments.dtype, moments.device)
                past, valid, proj = self.ring.stored(stream, w, derivs)
                if deferred:
                    self._pending = _Deferred(self._step, stream, self.ring.heads[stream], m,
                                              rec is not None)
                nvalid = valid.sum()
                row, int_counts = self._factors(nvalid, m, moments.dtype, moments.device)
                stats = pool(moments, past, valid, row[0])
                if self.probe is not None and stream == 0:
                    self._record_probe(moments, self.ring.stored(stream, None, None)[0],
                                       valid, stats)
            mean, var = stats[0], stats[1]
            invstd = (var + self.eps).rsqrt()
            bad = non_finite(stats, proj)
            if isinstance(m, Tensor):  # SyncCBN: no process had an element
                bad = bad | (m == 0)
            self.cbn_skipped.add_(bad)
            if stream is not None:
                self.ring.push(stream, moments, derivs, proj, bad)
            self._update_running(stats, row, bad)
            counts = kern.counts(row, int_counts, nvalid)
            self.steps.record((mean, invstd, var, counts))
        return CountNormalize.apply(y, self.weight, self.bias, mean, invstd, var, self.eps, counts,
                                    kern, self._grad_reducer(), self.steps.marker())

    def _record_probe(self, moments, past, valid, stats):
        """For statistics studies: the mean/var that BN (this batch), plain averaging of the
        window and CBN would normalize with at this call (before this batch is stored)."""
        def mean_var(s):
            return s[0].clone(), (s[1] - s[0] * s[0]).clamp_min(0)
        n = valid.sum() + 1
        plain = (torch.where(valid.view(-1, 1, 1), past, 0).sum(0) + moments) / n
        self.probe.update(batch=mean_var(moments), plain=mean_var(plain),
                          cbn=(stats[0].clone(), stats[1].clone()), step=self._step)

    def _update_running(self, stats, row, bad):
        """Running statistics follow the window's mean and (unbiased) variance: the statistics the
        layer normalized with in training, so eval sees what training saw. A non-finite batch
        leaves them unchanged."""
        if not self.track_running_stats:
            return
        self.num_batches_tracked.add_(1)
        self.__dict__['_tracked'] = self._tracked + 1
        factor = self.momentum if self.momentum is not None else 1.0 / self._tracked
        new = (stats * row[1:3, None]).to(self.running_mean.dtype)
        for i, running in enumerate((self.running_mean, self.running_var)):  # two tensors:
            running.lerp_(torch.where(bad, running, new[i]), factor)        # nothing aliased

    def _empty(self, y):
        """No positions (e.g. a mask head with no positive RoI): no statistics, no state change;
        the affine parameters stay in the graph (zero gradient) so DDP sees them used."""
        zeros = y.new_zeros(self.num_features, dtype=stats_dtype(y.dtype))
        return F.batch_norm(y, zeros, torch.ones_like(zeros), self.weight, self.bias, False, 0.0, self.eps)

    def _recompute(self, y):
        """Rerun of this step's call by activation checkpointing: same statistics, no state change
        beyond the derivatives the first forward could not compute (see :meth:`_complete`)."""
        saved = self.steps.replayed()
        if self._pending is not None and self._pending.step == self._step:
            self._complete(y)
        if saved is None:  # a BN step: batch statistics; the running ones passed (momentum 0,
            # unchanged) so that the rerun saves the same tensors as the first forward
            running = (self.running_mean, self.running_var) if self.track_running_stats else (None, None)
            out = F.batch_norm(y, *running, self.weight, self.bias, True, 0.0, self.eps)
            self.steps.watch(out)
            return out
        mean, invstd, var, counts = saved
        return CountNormalize.apply(y, self.weight, self.bias, mean, invstd, var, self.eps,
                                    counts, kernels.select(y), self._grad_reducer(),
                                    self.steps.marker())

    def _complete(self, y):
        """Store the deferred iteration's derivatives and projections: in the recomputation the
        conv's input is there again (the weight has not changed since the first forward)."""
        pending, self._pending = self._pending, None
        rec, _ = find_producing_conv(y)
        if rec is None or rec.weight is None:
            return  # nothing upstream trains: the slot stays without compensation
        self._conv_weight = weakref.ref(rec.weight)
        w = rec.weight.detach().reshape(self.num_features, -1)
        with torch.no_grad(), no_autocast(y.device.type):
            derivs = self._recomputed_derivatives(rec, y, pending.m)
            self.ring.complete(pending.stream, pending.slot, derivs, w)

    def _recomputed_derivatives(self, rec, y, m):
        """This iteration's (C + G, K) derivatives from the recomputation (SyncCBN: summed over
        the processes, ``m`` their total element count)."""
        return derivatives(rec, y)

    # ------------------------------------------------------------------ state
    def _apply(self, fn, *args, **kwargs):
        """``.to()``, ``.half()`` and the like: convert the window too (it is not a buffer), and
        drop the work tensors and cached views of the old tensors (rebuilt for the new ones)."""
        out = super()._apply(fn, *args, **kwargs)
        apply_to_window(self, fn)
        self._work.clear()
        self.ring._cache = None
        return out

    def window_state(self) -> dict:
        """The stored iterations (checkpoint layout, on the CPU), for an exact resume; what
        ``CBNHook(save_window=True)`` writes into checkpoints."""
        self.ring.sync()
        return saved_state(self)

    def load_window_state(self, state: dict) -> None:
        """Restore what :meth:`window_state` returned (adapted to this layer's ``window``)."""
        state = dict(state)
        msg = adapt_state(state, '', self.window, self._name())
        if msg:
            warn(msg)
        self._set_window(state, '')
        self.ring = RingWindow(self)

    def _set_window(self, state, prefix):
        for name in BUFFERS:
            src, cur = state.pop(prefix + name), getattr(self, name)
            dt = cur.dtype if name in ('cbn_valid', 'cbn_head') else self.running_mean.dtype
            setattr(self, name, src.to(device=cur.device, dtype=dt, copy=True))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        """Layout 3: weights, BN buffers, counters; the window starts empty (it described the
        weights before this load) unless restored by :meth:`load_window_state`. Layouts < 3
        that hold a window (earlier CBN checkpoints) restore it."""
        version = local_metadata.get('version', None)
        old = [k for k in WINDOW_KEYS + BUFFERS if prefix + k in state_dict]
        if (version is None or version < 3) and old:
            state_dict = dict(state_dict)  # adapted below; the caller's dict stays as it was
            msg = adapt_state(state_dict, prefix, self.window, self._name())
            if msg:
                warn(msg)
            self._set_window(state_dict, prefix)
        else:
            self.reset_window()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        ours = {prefix + n for n in COUNTERS}  # a plain BN checkpoint loads strictly
        missing_keys[:] = [k for k in missing_keys if k not in ours]
        self._reset_host_state()
