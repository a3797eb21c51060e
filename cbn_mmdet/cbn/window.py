"""The window's ring buffer: the last ``window - 1`` iterations of each call stream.

The tensors are plain attributes of the owning module, not buffers: they are training state
of changing shape (they grow with the call streams), so they stay out of ``buffers()`` and the
module's ``state_dict`` (what EMA copies and averages, what a deployed BN model loads). The
module converts them in ``_apply`` (``.to()``, ``.half()``); checkpoints carry them only when
asked (:func:`saved_state`, written by ``CBNHook`` next to the state_dict). This object knows
their layout and is the only code that reads or writes them.
Per stream ``s`` (the i-th call of a step; a head shared across FPN levels has several) and
slot ``e`` (``E = window - 1`` slots, ``head[s]`` is the oldest, overwritten next):

    cbn_moments (S, E, 2, C)    (mu, nu) of the stored iteration
    cbn_proj    (S, E, 2, C)    <d mu/dW, W_s>, <d nu/dW, W_s>: its weight snapshot as the
                                compensation uses it (no weight-sized copy of W_s is kept)
    cbn_deriv   (S, C+G, E, K)  d nu/dW per channel (rows 0..C-1), then d mu/dW per conv group
                                (K = C_in/groups * kh * kw): one tensor, one product for both
    cbn_valid   (S, E) bool     the slot holds a finite iteration
    cbn_head    (S,)          next slot to overwrite (kept on the host, written at save time)

In a checkpoint the window is kept in the layout of every release (:func:`saved_state`), one
tensor per moment, projection and derivative, so tools reading ``cbn_dnu`` keep working.
"""
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .functional import compensation_terms, non_finite

FLOAT_BUFFERS = ('cbn_moments', 'cbn_proj', 'cbn_deriv')
BUFFERS = FLOAT_BUFFERS + ('cbn_valid', 'cbn_head')
# The checkpoint layout: (S, E, C) per moment and projection, (S, G, E, K) / (S, C, E, K) per
# derivative, float validity, plus cbn_valid and cbn_head.
SAVED_BUFFERS = ('cbn_mu', 'cbn_nu', 'cbn_wmu', 'cbn_wnu', 'cbn_dmu', 'cbn_dnu')


def init_window(module, device=None, dtype=None):
    """Empty window tensors on ``module`` (plain attributes, see the module docstring)."""
    for name in FLOAT_BUFFERS:
        setattr(module, name, torch.zeros(0, device=device, dtype=dtype))
    module.cbn_valid = torch.zeros(0, dtype=torch.bool, device=device)
    module.cbn_head = torch.zeros(0, dtype=torch.long, device=device)


def apply_to_window(module, fn):
    """``fn`` (what ``nn.Module._apply`` applies to buffers) on each window tensor."""
    for name in BUFFERS:
        setattr(module, name, fn(getattr(module, name)))


def saved_state(module, device='cpu') -> dict:
    """The window of ``module`` in the checkpoint layout, as copies on ``device`` (on the CPU by
    default: no second copy of the window on the accelerator), suffixes without prefix."""
    def copy(t):
        return t.detach().to(device, copy=True)
    moments, proj, deriv = module.cbn_moments, module.cbn_proj, module.cbn_deriv
    out = {}
    if moments.dim() == 4:
        out['cbn_mu'], out['cbn_nu'] = (copy(t) for t in moments.unbind(2))
        out['cbn_wmu'], out['cbn_wnu'] = (copy(t) for t in proj.unbind(2))
    else:
        out.update((n, copy(moments)) for n in ('cbn_mu', 'cbn_nu', 'cbn_wmu', 'cbn_wnu'))
    if deriv.dim() == 4:
        c = moments.shape[-1]
        out['cbn_dmu'], out['cbn_dnu'] = copy(deriv[:, c:]), copy(deriv[:, :c])
    else:
        out['cbn_dmu'], out['cbn_dnu'] = copy(deriv), copy(deriv)
    out['cbn_valid'] = copy(module.cbn_valid).to(moments.dtype)
    out['cbn_head'] = copy(module.cbn_head)
    return out


class RingWindow:
    """Reads and writes the window buffers of ``module`` (a CrossIterationBatchNorm2d)."""

    def __init__(self, module):
        self.module = module
        self.heads: List[int] = [int(h) for h in module.cbn_head.tolist()]
        self._cache = None  # see _views

    @property
    def slots(self) -> int:
        return self.module.window - 1

    def streams(self) -> int:
        m = self.module.cbn_moments
        return m.shape[0] if m.dim() == 4 else 0

    def clear(self):
        for name in BUFFERS:
            buf = getattr(self.module, name)
            setattr(self.module, name, buf.new_zeros(0))
        self.heads = []

    def ensure(self, stream: int, c: int, dtype, device):
        """Grow to ``stream + 1`` streams (empty slots); keep the float buffers in ``dtype`` (a
        ``.half()`` on the module converts them, the statistics stay float32)."""
        mod = self.module
        if stream < len(self.heads) and mod.cbn_moments.dtype == dtype:
            return  # the hot path: nothing to grow or convert
        for name in FLOAT_BUFFERS:
            buf = getattr(mod, name)
            if buf.dtype != dtype:
                setattr(mod, name, buf.to(dtype))
        have = self.streams()
        grow = stream + 1 - have
        if grow <= 0:
            return
        e = self.slots

        def grown(buf, tail, dt):
            new = torch.zeros((grow,) + tuple(tail), dtype=dt, device=device)
            return torch.cat([buf, new]) if have else new
        mod.cbn_moments = grown(mod.cbn_moments, (e, 2, c), dtype)
        mod.cbn_proj = grown(mod.cbn_proj, (e, 2, c), dtype)
        mod.cbn_valid = grown(mod.cbn_valid, (e,), torch.bool)
        mod.cbn_head = grown(mod.cbn_head, (), torch.long)
        if mod.cbn_deriv.dim() == 4:
            mod.cbn_deriv = grown(mod.cbn_deriv, mod.cbn_deriv.shape[1:], dtype)
        self.heads += [0] * grow

    def has_derivatives(self, rows: int, k: int) -> bool:
        d = self.module.cbn_deriv
        return d.dim() == 4 and d.shape[1] == rows and d.shape[-1] == k

    def _ensure_derivatives(self, rows: int, k: int):
        mod = self.module
        if mod.cbn_deriv.dim() == 4:
            if self.has_derivatives(rows, k):
                return
            raise RuntimeError(f'{mod._name()}: the producing conv changed shape (stored '
                               f'{tuple(mod.cbn_deriv.shape[1::2])}, now {(rows, k)}); call reset_window()')
        s, e = mod.cbn_moments.shape[:2]
        mod.cbn_deriv = torch.zeros(s, rows, e, k, dtype=mod.cbn_moments.dtype,
                                    device=mod.cbn_moments.device)

    def _views(self, stream: int) -> dict:
        """Views of the stream's buffers and of each of its slots, built once per buffer set
        (the hot path then indexes nothing; new buffers - growth, ``.to()``, loading - rebuild)."""
        b = self.module
        src = (b.cbn_moments, b.cbn_proj, b.cbn_deriv, b.cbn_valid)
        if self._cache is None or any(x is not y for x, y in zip(self._cache[0], src)):
            self._cache = (src, {})
        views = self._cache[1].get(stream)
        if views is None:
            m, p, d, v = (t[stream] if t.dim() > 1 else None for t in src)
            views = self._cache[1][stream] = dict(
                moments=m, proj=p, deriv=d, valid=v,
                slots=[(m[h], p[h], d[:, h] if d is not None else None, v[h])
                       for h in range(self.slots)])
        return views

    def stored(self, stream: int, w: Optional[Tensor], derivs: Optional[Tensor]
               ) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        """The stream's stored moments compensated to the current weight ``w`` (E, 2, C), their
        validity (E,), and the projections of the current ``derivs`` (C + G, K) on ``w`` (2, C)
        or None. One product projects the stored derivatives and the current ones together.
        """
        v = self._views(stream)
        moments, valid = v['moments'], v['valid']
        if derivs is None:  # this iteration's derivatives come later (checkpointing) or never
            if w is None or v['deriv'] is None or v['deriv'].shape[-1] != w.shape[1]:
                return moments, valid, None
            return moments + (compensation_terms(v['deriv'], w) - v['proj']), valid, None
        if not self.has_derivatives(*derivs.shape):  # nothing stored with derivatives yet
            return moments, valid, compensation_terms(derivs[:, None], w)[0]
        # One product for the stored and the current derivatives needs them side by side: a
        # copy of this layer's stored derivatives, for this call only (freed on return, so the
        # layers keep nothing beside their windows; a call's transient is its layer's window).
        p = compensation_terms(torch.cat((v['deriv'], derivs[:, None]), 1), w)
        e = self.slots
        return moments + (p[:e] - v['proj']), valid, p[e]

    def push(self, stream: int, moments: Tensor, derivs, proj: Optional[Tensor], bad: Tensor):
        """Store this iteration in the stream's oldest slot; it counts only when not ``bad``
        (non-finite): a non-finite iteration drops the oldest entry and never enters."""
        h = self.heads[stream]
        if derivs is not None:
            self._ensure_derivatives(*derivs.shape)
        slot_m, slot_p, slot_d, slot_v = self._views(stream)['slots'][h]
        slot_m.copy_(moments)
        torch.logical_not(bad, out=slot_v)
        if derivs is not None:
            slot_d.copy_(derivs)
            slot_p.copy_(proj)
        elif slot_d is not None:  # no compensation for this slot
            slot_d.zero_()
            slot_p.zero_()
        self.heads[stream] = (h + 1) % self.slots

    def complete(self, stream: int, slot: int, derivs: Tensor, w: Tensor):
        """Add the derivatives (C + G, K) of an iteration pushed without them, and their
        projections on its weight ``w``; a non-finite projection invalidates the slot."""
        self._ensure_derivatives(*derivs.shape)
        _, slot_p, slot_d, slot_v = self._views(stream)['slots'][slot]
        proj = compensation_terms(derivs[:, None], w)[0]
        slot_d.copy_(derivs)
        slot_p.copy_(proj)
        slot_v.logical_and_(non_finite(proj).logical_not())

    def sync(self):
        """Write the host-side heads into ``cbn_head`` (before the state is saved)."""
        head = self.module.cbn_head
        if head.numel() and head.tolist() != self.heads:
            head.copy_(torch.tensor(self.heads, dtype=head.dtype))


def adapt_state(state_dict, prefix: str, window: int, name: str) -> Optional[str]:
    """Rewrite a saved window in ``state_dict`` into the internal layout, for this layer's
    ``window``; returns a sentence saying what was adapted, or None when the window matched.

    The most recent ``window - 1`` iterations are kept (fewer if fewer were stored), oldest first.
    """
    key = prefix.__add__
    if key('cbn_mu') in state_dict:  # the checkpoint layout (see saved_state)
        mu, nu, wmu, wnu, dmu, dnu = (state_dict.pop(key(n)) for n in SAVED_BUFFERS)
        if mu.dim() == 3:
            state_dict[key('cbn_moments')] = torch.stack((mu, nu), 2)
            state_dict[key('cbn_proj')] = torch.stack((wmu, wnu), 2)
        else:
            state_dict[key('cbn_moments')] = mu
            state_dict[key('cbn_proj')] = wmu
        state_dict[key('cbn_deriv')] = torch.cat((dnu, dmu), 1) if dnu.dim() == 4 else dnu
    # (checkpoints written between 2026-11-29 and 2026-12-01 hold the internal layout itself)
    if key('cbn_valid') in state_dict:
        state_dict[key('cbn_valid')] = state_dict[key('cbn_valid')] > 0
    moments = state_dict.get(key('cbn_moments'))
    if moments is None or moments.dim() != 4 or moments.shape[1] == window - 1:
        return None
    s, e_old = moments.shape[:2]
    e_new = window - 1
    head = state_dict[key('cbn_head')].tolist()
    keep = min(e_old, e_new)
    # per stream, slot indices from oldest to newest; keep the newest `keep`
    order = torch.tensor([[(h + i) % e_old for i in range(e_old)][e_old - keep:] for h in head],
                         dtype=torch.long)
    has_d = state_dict.get(key('cbn_deriv')) is not None and state_dict[key('cbn_deriv')].dim() == 4

    def take(t, dim):
        idx = order.view((s,) + (1,) * (dim - 1) + (keep,) + (1,) * (t.dim() - dim - 1))
        picked = torch.gather(t, dim, idx.expand(t.shape[:dim] + (keep,) + t.shape[dim + 1:]))
        pad = list(picked.shape)
        pad[dim] = e_new - keep
        return torch.cat((picked, picked.new_zeros(pad)), dim)
    for n in ('cbn_moments', 'cbn_proj', 'cbn_valid'):
        state_dict[key(n)] = take(state_dict[key(n)], 1)
    if has_d:
        state_dict[key('cbn_deriv')] = take(state_dict[key('cbn_deriv')], 2)
    state_dict[key('cbn_head')] = torch.full((s,), keep % e_new if e_new else 0, dtype=torch.long)
    what = (f'{name}: the saved window holds {e_old} stored iterations, this layer keeps '
            f'{e_new} (window={window}); kept the newest {keep}')
    return what

