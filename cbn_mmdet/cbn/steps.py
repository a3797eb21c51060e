"""Which training step a layer call belongs to, seen from inside the layer.

CBN's window holds one entry per training step, but a layer never sees the optimizer: it infers
step boundaries from its own calls. :class:`StepTracker` keeps that host-side bookkeeping (no
device syncs): the step counter, the calls of the current step (a head shared across FPN levels
is called several times per step), whether a backward pass reached the layer since, and what
each call normalized with, for activation checkpointing's recomputation.
"""
import weakref
from typing import Callable, Optional

import torch
from torch import Tensor

from .warn import warn

# More calls than this in one step (no backward, no update in between) are taken as new steps.
MAX_CALLS_PER_STEP = 16


class StepTracker:
    """Step counter and per-step call bookkeeping of one layer.

    A new step starts when a backward pass has reached the layer since its last call, when a
    parameter it can see (its conv's weight, its own affine parameters) changed since then, or
    on every call when no gradient can flow. Further calls in the same step get their own
    stream index: the i-th call of a step pools with the i-th calls of earlier steps.
    """

    def __init__(self, step: int, name: Callable[[], str], driven: bool = False):
        self.step = step                 # steps begun so far (the layer's cbn_step)
        self.driven = driven             # steps begin at new_iteration() only (a runner's hook)
        self.boundary = True             # driven: the next call begins a step
        self.calls = 0                   # calls so far in the current step
        self.backward_seen = True        # a backward pass reached the layer since its last call
        self.signature = None            # parameter versions at the last call
        self.replay: list = []           # per call of this step: what it normalized with
        self.overflow = False            # too many calls without backward: one step per call
        self._name = name

    def begin_call(self, y: Tensor, params) -> bool:
        """Account for one training-mode call; True when it starts a new step. ``params``: the
        parameters the layer can see (None entries allowed)."""
        if self.driven:
            return self._driven_call()
        params = [p for p in params if p is not None and p.requires_grad]
        signature = tuple(p._version for p in params)
        grads_flow = torch.is_grad_enabled() and (y.requires_grad or bool(params))
        if self.calls >= MAX_CALLS_PER_STEP and not (self.backward_seen or self.overflow):
            warn(f'{self._name()} was called {self.calls} times in training mode with '
                 'no backward pass or parameter update in between; treating each further '
                 'call as a new training step (until a backward pass reaches the layer). '
                 'Call backward() per step, or run such passes under torch.no_grad().')
            self.overflow = True
        new_step = (self.backward_seen or self.overflow or signature != self.signature
                    or not grads_flow)
        if new_step:
            self.step += 1
            self.calls, self.replay, self.backward_seen = 0, [], False
        self.signature = signature
        self.calls += 1
        return new_step

    def new_iteration(self) -> None:
        """The training loop begins an iteration: the next call begins a step."""
        self.boundary = True

    def _driven_call(self) -> bool:
        new_step, self.boundary = self.boundary, False
        if new_step:
            self.step += 1
            self.calls, self.replay, self.backward_seen = 0, [], False
        self.calls += 1
        return new_step

    @property
    def stream(self) -> int:
        """The current call's index within its step."""
        return self.calls - 1

    def marker(self) -> Callable:
        """A callable that records (weakly) that a backward pass reached the layer."""
        ref = weakref.ref(self)

        def _seen(*_):
            tracker = ref()
            if tracker is not None:
                tracker.backward_seen, tracker.overflow = True, False
        return _seen

    def watch(self, out: Tensor) -> None:
        """Mark the step's backward when it reaches ``out`` (plain BN calls: no custom Function)."""
        if out.requires_grad:
            out.register_hook(self.marker())

    def record(self, saved: Optional[tuple]) -> None:
        """What this call normalized with (None: batch statistics) for a recomputation."""
        self.replay.append(saved)

    def replayed(self) -> Optional[tuple]:
        """The saved normalization of this step's only call (activation checkpointing reruns it)."""
        if len(self.replay) != 1:
            raise RuntimeError(
                f'{self._name()} is being recomputed (activation checkpointing) but was called '
                f'{len(self.replay)} times in this step; CBN supports checkpointing of layers '
                'called once per step.')
        return self.replay[0]
