"""What differs between the torch releases we support (2.1 to the newest), in one place.

Each capability is detected once (at import, or again by :func:`resolve`, which the tests call
after removing an API) and the layer calls the chosen function. Private APIs are used only
where they exist; every fallback gives the same results (tests/cbn/test_compat.py runs training
steps with each private API removed).

Importing this module patches nothing. Where a private API is missing (torch < 2.8 has no
``_top_saved_tensors_default_hooks``), its fallback counts entries of torch's
``saved_tensors_hooks`` (and, without ``_current_graph_task_id``, the reentrant checkpoint's
backward): :func:`ensure_tracker` wraps those methods once, when the first CBN layer is built,
and torch's own methods still do all the work (tests/test_import_side_effects.py: a model
without CBN checkpoints bit-identically with the wrappers in place).
"""
import functools
import threading

import torch
import torch.autograd.graph as autograd_graph

__all__ = ['autocast_enabled', 'reduced_matmul_precision', 'saved_tensors_hooks_active',
           'in_backward_recompute', 'addcmul_into', 'resolve', 'ensure_tracker']


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


# ---------------------------------------------------------------- matmul precision
def _has_setting(obj, name: str) -> bool:
    """``hasattr`` for torch's backend modules (torch < 2.9's ``torch.backends.cuda.matmul``
    raises AssertionError, not AttributeError, for a name it does not know)."""
    try:
        getattr(obj, name)
    except (AttributeError, AssertionError):
        return False
    return True


@functools.lru_cache(maxsize=None)
def _matmul_settings(device_type: str) -> tuple:
    """The per-backend settings that decide a float32 matmul's precision on ``device_type``,
    innermost first (a backend's ``'none'`` defers to the generic ``torch.backends``). Found
    once per device type: the setting objects are torch's singletons, their values are read
    per call."""
    backend = {'cuda': getattr(torch.backends.cuda, 'matmul', None),
               'cpu': getattr(getattr(torch.backends, 'mkldnn', None), 'matmul', None)}.get(device_type)
    return tuple(b for b in (backend, torch.backends) if _has_setting(b, 'fp32_precision'))


def _reduced_per_backend(device_type: str) -> bool:  # torch >= 2.9: fp32_precision per backend
    for setting in _matmul_settings(device_type):
        value = setting.fp32_precision
        if value != 'none':
            return value != 'ieee'
    return False


def _reduced_legacy(device_type: str) -> bool:  # the process-wide set_float32_matmul_precision
    return torch.get_float32_matmul_precision() != 'highest'


def _per_backend_api() -> bool:
    return _has_setting(getattr(torch.backends.cuda, 'matmul', None), 'fp32_precision')


# ---------------------------------------------------------------- saved-tensor hooks
# Activation checkpointing (non-reentrant) runs the forward under saved-tensor hooks; reading a
# conv's saved input there would trigger recomputation. torch >= 2.8 tells us the top of the hook
# stack (private); before that we count the public context managers entered on this thread.
_tls = threading.local()


def _entered(name: str) -> list:
    """This thread's entered-and-not-exited objects of one kind, innermost last."""
    stack = getattr(_tls, name, None)
    if stack is None:
        stack = []
        setattr(_tls, name, stack)
    return stack


def _leave(name: str, obj) -> None:
    stack = _entered(name)
    for i in range(len(stack) - 1, -1, -1):  # an object entered before the tracker is not there
        if stack[i] is obj:
            del stack[i]
            return


def _top_hooks_private() -> bool:
    return torch._C._autograd._top_saved_tensors_default_hooks(False) is not None


def _top_hooks_tracked() -> bool:
    if not _installed['hooks']:
        ensure_tracker()  # a layer that was not built in this process (unpickled): best effort
    return len(_entered('hooks')) > 0


# What the chosen fallbacks need counted ('hooks': entries of saved_tensors_hooks; 'backward':
# the reentrant checkpoint's backward) and what is installed. Nothing is patched at import: the
# first CBN layer built calls ensure_tracker(), before any of its forwards can run under hooks.
_needed = {'hooks': False, 'backward': False}
_installed = {'hooks': False, 'backward': False}


def _install_hooks_tracker() -> None:
    """Count entries of ``saved_tensors_hooks`` (and its subclasses: checkpointing's
    ``_checkpoint_hook`` / ``_recomputation_hook``, ``save_on_cpu``) per thread. torch's own
    ``__enter__`` / ``__exit__`` run first / last, unchanged: the same return values and
    exceptions; a context entered before this ran is simply not counted."""
    if _installed['hooks']:
        return
    cls = autograd_graph.saved_tensors_hooks
    enter, exit_ = cls.__enter__, cls.__exit__

    @functools.wraps(enter)
    def __enter__(self):
        out = enter(self)
        _entered('hooks').append(self)
        if type(self).__name__ == '_recomputation_hook':
            _entered('recompute').append(self)
        return out

    @functools.wraps(exit_)
    def __exit__(self, *exc):
        _leave('recompute', self)
        _leave('hooks', self)
        return exit_(self, *exc)

    cls.__enter__, cls.__exit__ = __enter__, __exit__
    _installed['hooks'] = True


def _install_backward_tracker() -> None:
    """Count the reentrant checkpoint's backward (it recomputes the forward) per thread."""
    if _installed['backward']:
        return
    import torch.utils.checkpoint as checkpoint
    fn = getattr(checkpoint, 'CheckpointFunction', None)
    if fn is not None:
        backward = fn.backward

        @functools.wraps(backward)
        def tracked_backward(ctx, *args):
            token = object()
            _entered('recompute').append(token)
            try:
                return backward(ctx, *args)
            finally:
                _leave('recompute', token)
        fn.backward = staticmethod(tracked_backward)
    _installed['backward'] = True


def ensure_tracker() -> None:
    """Install the counting that the chosen fallbacks read (nothing on torch with both private
    APIs, torch >= 2.8). Called when a CBN layer is built, so that a process that builds none
    keeps torch's classes untouched. Idempotent and cheap."""
    if _needed['hooks'] and not _installed['hooks']:
        _install_hooks_tracker()
    if _needed['backward'] and not _installed['backward']:
        _install_backward_tracker()


def tracker_installed() -> dict:
    """What :func:`ensure_tracker` has patched in this process, ``{'hooks': bool, 'backward': bool}``."""
    return dict(_installed)


# ---------------------------------------------------------------- recomputation in backward
def _in_graph_task_private() -> bool:
    return torch._C._current_graph_task_id() != -1


def _in_recompute_tracked() -> bool:
    if not (_installed['hooks'] and _installed['backward']):
        ensure_tracker()  # see _top_hooks_tracked
    return len(_entered('recompute')) > 0


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
reduced_matmul_precision = _reduced_per_backend
saved_tensors_hooks_active = _top_hooks_private
in_backward_recompute = _in_graph_task_private
addcmul_into = _addcmul_direct


PRIVATE_APIS = ('_top_saved_tensors_default_hooks', '_current_graph_task_id')


def resolve(missing=(), install=True) -> dict:
    """Pick each function for the torch in use; returns ``{capability: implementation name}``.

    ``missing``: capabilities to treat as absent (tests): a name of :data:`PRIVATE_APIS`,
    ``'autocast_device_arg'``, ``'per_backend_precision'`` or ``'mixed_addcmul'``. (torch's own checkpointing calls the
    private APIs on new releases, so a test cannot always delete them for real.)
    ``install``: patch torch for the chosen fallbacks now (:func:`ensure_tracker`); the import
    passes False, leaving that to the first CBN layer built.
    """
    global autocast_enabled, reduced_matmul_precision, saved_tensors_hooks_active
    global in_backward_recompute, addcmul_into
    unknown = set(missing) - set(PRIVATE_APIS) - {'autocast_device_arg', 'per_backend_precision',
                                                    'mixed_addcmul'}
    if unknown:
        raise ValueError(f'compat.resolve: unknown capabilities {sorted(unknown)}')
    autocast_enabled = (_autocast_enabled_by_device
                        if 'autocast_device_arg' not in missing and _takes_device_type()
                        else _autocast_enabled_legacy)
    # reading the process-wide setting after a per-backend one was set raises: never mix them
    reduced_matmul_precision = (_reduced_per_backend
                                if 'per_backend_precision' not in missing and _per_backend_api()
                                else _reduced_legacy)
    has_top = ('_top_saved_tensors_default_hooks' not in missing
               and hasattr(torch._C._autograd, '_top_saved_tensors_default_hooks'))
    has_task = ('_current_graph_task_id' not in missing
                and hasattr(torch._C, '_current_graph_task_id'))
    # the hooks count serves both fallbacks (the recomputation hook is one of the hooks); the
    # reentrant backward's count only the recomputation query
    _needed['hooks'] = not (has_top and has_task)
    _needed['backward'] = not has_task
    if install:
        ensure_tracker()
    saved_tensors_hooks_active = _top_hooks_private if has_top else _top_hooks_tracked
    in_backward_recompute = _in_graph_task_private if has_task else _in_recompute_tracked
    addcmul_into = (_addcmul_direct if 'mixed_addcmul' not in missing and _mixed_addcmul_works()
                    else _addcmul_upcast)
    return {'autocast_enabled': autocast_enabled.__name__,
            'reduced_matmul_precision': reduced_matmul_precision.__name__,
            'saved_tensors_hooks_active': saved_tensors_hooks_active.__name__,
            'in_backward_recompute': in_backward_recompute.__name__,
            'addcmul_into': addcmul_into.__name__}


resolve(install=False)
