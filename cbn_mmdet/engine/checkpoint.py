"""Loading mmengine checkpoints under torch >= 2.6 without turning off safe loading.

mmengine 0.10.7 calls ``torch.load`` without ``weights_only``; torch >= 2.6 defaults to
``weights_only=True``, and mmengine checkpoints hold a few non-tensor objects (the message
hub's ``HistoryBuffer``, its statistics methods, and numpy arrays), so ``--resume``, ``load_from`` and ``tools/test.py``
fail with "Unsupported global". :func:`load_local_checkpoint` loads with exactly those types
allowed (the same ``torch.load`` call as mmengine's otherwise, so torch's defaults and its
``TORCH_FORCE_*WEIGHTS_ONLY_LOAD`` variables apply as they do to mmengine).

mmengine's loader for local paths becomes :func:`load_from_local_safe`, in two scopes:

- importing ``cbn_mmdet``: mmengine's own loader runs first, and its result or its error is
  what the caller gets, except that a CBN checkpoint (one with CBN buffers or windows) that it
  refuses only for mmengine's types is loaded with them allowed. Any other file loads, or
  fails, exactly as without the plugin.
- our runners (:func:`cbn_mmdet.engine.launch.build_runner`: tools/train.py, test.py, ...) and
  ``CBNHook`` (a runner of MMDetection's own tools): any checkpoint, CBN or not, is loaded
  with mmengine's types allowed (``--resume`` of a BN baseline trained with our tools).

Allowing types needs ``torch.serialization.safe_globals`` (torch >= 2.5). Older torch loads
with ``weights_only=False`` by default, so mmengine's own loader works there and is kept.
"""
import os.path as osp
import pickle

import torch

_installed = False
_any_checkpoint = False  # install_checkpoint_loader(any_checkpoint=True) was called


def _history_buffer_method(obj, name):
    """Stands in for ``getattr`` while unpickling: mmengine's message hub pickles
    ``HistoryBuffer``'s statistics methods as ``getattr(HistoryBuffer, 'mean')``; nothing else
    may be looked up."""
    from mmengine.logging import HistoryBuffer
    allowed = {'min', 'max', 'current', 'mean'} | set(HistoryBuffer._statistics_methods)
    if obj is not HistoryBuffer or name not in allowed:
        raise pickle.UnpicklingError(f'refusing getattr({obj!r}, {name!r}) in a checkpoint')
    return getattr(obj, name)


def mmengine_safe_globals() -> list:
    """The non-tensor types found in mmengine/mmdet training checkpoints."""
    import numpy as np
    from mmengine.logging import HistoryBuffer
    globs = [HistoryBuffer, np.ndarray, np.dtype, (_history_buffer_method, 'builtins.getattr')]
    # numpy's array pickling helper moved between numpy 1.x and 2.x.
    try:
        from numpy._core.multiarray import _reconstruct, scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct, scalar
    globs += [_reconstruct, scalar]
    # dtype classes (numpy >= 1.25 pickles dtypes by their class, e.g. Float64DType).
    dtypes = getattr(np, 'dtypes', None)
    if dtypes is not None:
        globs += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith('DType')]
    return globs


def needs_safe_loader() -> bool:
    """Whether mmengine's loader needs replacing: torch can allow types (and so defaults to or
    offers safe loading). Earlier torch keeps mmengine's loader."""
    return hasattr(torch.serialization, 'safe_globals')


def load_local_checkpoint(filename, map_location=None):
    """Load a local checkpoint file as mmengine does (the same checks, the same ``torch.load``
    call) with mmengine's checkpoint types allowed for safe loading."""
    filename = osp.expanduser(filename)
    if not osp.isfile(filename):
        raise FileNotFoundError(f'{filename} can not be found.')
    if not needs_safe_loader():  # torch < 2.5: no allow-list; load as mmengine does there
        return torch.load(filename, map_location=map_location)
    with torch.serialization.safe_globals(mmengine_safe_globals()):
        return torch.load(filename, map_location=map_location)


def is_cbn_checkpoint(checkpoint) -> bool:
    """A checkpoint of a model with CBN layers: windows saved by ``CBNHook``, or CBN's own
    entries (step counters, window of state_dict layout < 3) in its state_dict."""
    if not isinstance(checkpoint, dict):
        return False
    if 'cbn_window' in checkpoint:
        return True
    from ..cbn.layer import COUNTERS, WINDOW_KEYS
    ours = set(COUNTERS) | set(WINDOW_KEYS)
    state = checkpoint.get('state_dict', checkpoint)
    return isinstance(state, dict) and any(
        isinstance(k, str) and k.rsplit('.', 1)[-1] in ours for k in state)


# mmengine logs "Loads checkpoint by <name[10:]> backend": this one reads "local_safe backend".
def load_from_local_safe(filename, map_location=None):
    """mmengine's loader for local paths while ``cbn_mmdet`` is imported (see the module
    docstring for its two scopes)."""
    if _any_checkpoint:
        return load_local_checkpoint(filename, map_location)
    from mmengine.runner import checkpoint as mmengine_checkpoint
    try:
        return mmengine_checkpoint.load_from_local(filename, map_location)
    except pickle.UnpicklingError as refused:  # torch's safe loading refused a type
        try:
            checkpoint = load_local_checkpoint(filename, map_location)
        except Exception:
            checkpoint = None
        if checkpoint is not None and is_cbn_checkpoint(checkpoint):
            return checkpoint
        raise refused from None


def install_checkpoint_loader(any_checkpoint: bool = False):
    """Register :func:`load_from_local_safe` as mmengine's loader for local paths, for the rest
    of the process (idempotent; nothing to do on torch < 2.5, see the module docstring).
    ``any_checkpoint``: allow mmengine's types for every checkpoint, not only CBN ones (our
    runners and ``CBNHook``); once set, it stays set."""
    global _installed, _any_checkpoint
    if not needs_safe_loader():
        return
    _any_checkpoint = _any_checkpoint or any_checkpoint
    if _installed:
        return
    from mmengine.runner.checkpoint import CheckpointLoader
    CheckpointLoader.register_scheme(prefixes='', force=True)(load_from_local_safe)
    _installed = True
