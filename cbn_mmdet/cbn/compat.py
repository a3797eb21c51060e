"""What differs between the torch releases we support (2.1 to the newest), in one place.

Each capability is detected once (at import, or again by :func:`resolve`, which the tests call
after removing an API) and the layer calls the chosen function. Private APIs are used only
where they exist; every fallback gives the same results (tests/cbn/test_compat.py runs training
steps with each private API removed).
"""
import threading

import torch
import torch.autograd.graph as autograd_graph

__all__ = ['autocast_enabled', 'saved_tensors_hooks_active', 'in_backward_recompute',
           'addcmul_into', 'resolve']


# ---------------------------------------------------------------- autocast
def _autocast_enabled_by_device(device_type: str) -> bool:  # torch >= 2.4
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type without autocast ('meta', say): none enabled
        return False


def _autocast_enabled_legacy(device_type: str) -> bool:  # torch < 2.4: no argument
    if device_type == 'cpu':
        return torch.is_autocast_cpu_enabled()
    if device_type == 'cuda':
        return torch.is_autocast_enabled()
    return False  # no autocast for other devices before 2.4


def _takes_device_type() -> bool:
    try:
        torch.is_autocast_enabled('cpu')
    except TypeError:
        return False
    return True


# ---------------------------------------------------------------- saved-tensor hooks
# Activation checkpointing (non-reentrant) runs the forward under saved-tensor hooks; reading a
# conv's saved input there would trigger recomputation. torch >= 2.8 tells us the top of the hook
# stack (private); before that we count the public context managers entered on this thread.
_tls = threading.local()


def _depth(name: str) -> int:
    return getattr(_tls, name, 0)


def _top_hooks_private() -> bool:
    return torch._C._autograd._top_saved_tensors_default_hooks(False) is not None


def _top_hooks_tracked() -> bool:
    return _depth('hooks') > 0


_tracker_installed = False


def _install_tracker() -> None:
    """Count entries of ``saved_tensors_hooks`` (and its subclasses: checkpointing's
    ``_checkpoint_hook`` / ``_recomputation_hook``, ``save_on_cpu``) and of the reentrant
    checkpoint's backward, per thread. Installed once, only when a private API is missing."""
    global _tracker_installed
    if _tracker_installed:
        return
    cls = autograd_graph.saved_tensors_hooks
    enter, exit_ = cls.__enter__, cls.__exit__

    def tracked_enter(self):
        out = enter(self)
        _tls.hooks = _depth('hooks') + 1
        if type(self).__name__ == '_recomputation_hook':
            _tls.recompute = _depth('recompute') + 1
        return out

    def tracked_exit(self, *exc):
        if type(self).__name__ == '_recomputation_hook':
            _tls.recompute = _depth('recompute') - 1
        _tls.hooks = _depth('hooks') - 1
        return exit_(self, *exc)

    cls.__enter__, cls.__exit__ = tracked_enter, tracked_exit

    import torch.utils.checkpoint as checkpoint
    fn = getattr(checkpoint, 'CheckpointFunction', None)
    if fn is not None:  # reentrant checkpointing recomputes inside this backward
        backward = fn.backward

        def tracked_backward(ctx, *args):
            _tls.recompute = _depth('recompute') + 1
            try:
                return backward(ctx, *args)
            finally:
                _tls.recompute = _depth('recompute') - 1
        fn.backward = staticmethod(tracked_backward)
    _tracker_installed = True


# ---------------------------------------------------------------- recomputation in backward
def _in_graph_task_private() -> bool:
    return torch._C._current_graph_task_id() != -1


def _in_recompute_tracked() -> bool:
    return _depth('recompute') > 0


# ---------------------------------------------------------------- mixed-dtype addcmul_
def _addcmul_direct(out, a, b):
    return out.addcmul_(a, b)


def _addcmul_upcast(out, a, b):
    """``out += a * b`` computed in ``b``'s dtype and rounded once into ``out`` (torch 2.1's CPU
    addcmul_ asserts on a bf16 ``out`` with a float32 operand)."""
    if out.dtype == b.dtype:
        return out.addcmul_(a, b)
    return out.copy_(torch.addcmul(out.to(b.dtype), a, b))


def _mixed_addcmul_works() -> bool:
    try:
        t = torch.zeros(2, dtype=torch.bfloat16)
        t.addcmul_(torch.ones(2, dtype=torch.bfloat16), torch.ones(2))
    except RuntimeError:
        return False
    return True


# ---------------------------------------------------------------- selection
autocast_enabled = _autocast_enabled_by_device
saved_tensors_hooks_active = _top_hooks_private
in_backward_recompute = _in_graph_task_private
addcmul_into = _addcmul_direct


PRIVATE_APIS = ('_top_saved_tensors_default_hooks', '_current_graph_task_id')


def resolve(missing=()) -> dict:
    """Pick each function for the torch in use; returns ``{capability: implementation name}``.

    ``missing``: capabilities to treat as absent (tests): a name of :data:`PRIVATE_APIS`,
    ``'autocast_device_arg'`` or ``'mixed_addcmul'``. (torch's own checkpointing calls the
    private APIs on new releases, so a test cannot always delete them for real.)
    """
    global autocast_enabled, saved_tensors_hooks_active, in_backward_recompute, addcmul_into
    unknown = set(missing) - set(PRIVATE_APIS) - {'autocast_device_arg', 'mixed_addcmul'}
    if unknown:
        raise ValueError(f'compat.resolve: unknown capabilities {sorted(unknown)}')
    autocast_enabled = (_autocast_enabled_by_device
                        if 'autocast_device_arg' not in missing and _takes_device_type()
                        else _autocast_enabled_legacy)
    has_top = ('_top_saved_tensors_default_hooks' not in missing
               and hasattr(torch._C._autograd, '_top_saved_tensors_default_hooks'))
    has_task = ('_current_graph_task_id' not in missing
                and hasattr(torch._C, '_current_graph_task_id'))
    if not (has_top and has_task):
        _install_tracker()
    saved_tensors_hooks_active = _top_hooks_private if has_top else _top_hooks_tracked
    in_backward_recompute = _in_graph_task_private if has_task else _in_recompute_tracked
    addcmul_into = (_addcmul_direct if 'mixed_addcmul' not in missing and _mixed_addcmul_works()
                    else _addcmul_upcast)
    return {'autocast_enabled': autocast_enabled.__name__,
            'saved_tensors_hooks_active': saved_tensors_hooks_active.__name__,
            'in_backward_recompute': in_backward_recompute.__name__,
            'addcmul_into': addcmul_into.__name__}


resolve()
