"""Loading mmengine checkpoints under torch >= 2.6 without turning off safe loading.

mmengine 0.10.7 calls ``torch.load`` without ``weights_only``; torch >= 2.6 defaults to
``weights_only=True``, and mmengine checkpoints hold a few non-tensor objects (the message
hub's ``HistoryBuffer``, its statistics methods, and numpy arrays), so ``--resume``, ``load_from`` and ``tools/test.py``
fail with "Unsupported global". We replace mmengine's loader for local files by one that keeps
``weights_only=True`` and allows exactly those types, and only while it loads.

Allowing types needs ``torch.serialization.safe_globals`` (torch >= 2.5). Older torch loads
with ``weights_only=False`` by default, so mmengine's own loader works there and is kept.
"""
import pickle

import torch

_installed = False


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


# mmengine logs "Loads checkpoint by <name[10:]> backend": this one reads "local_safe backend".
def load_from_local_safe(filename, map_location=None):
    """mmengine's local-file loader with safe loading kept on and mmengine's types allowed."""
    import os.path as osp
    filename = osp.expanduser(filename)
    if not osp.isfile(filename):
        raise FileNotFoundError(f'{filename} can not be found.')
    if not needs_safe_loader():  # torch < 2.5: no allow-list; load as mmengine does there
        return torch.load(filename, map_location=map_location)
    with torch.serialization.safe_globals(mmengine_safe_globals()):
        return torch.load(filename, map_location=map_location, weights_only=True)


load_local_checkpoint = load_from_local_safe


def install_checkpoint_loader():
    """Register :func:`load_from_local_safe` as mmengine's loader for local paths (idempotent;
    nothing to do on torch < 2.5, see the module docstring)."""
    global _installed
    if _installed or not needs_safe_loader():
        return
    from mmengine.runner.checkpoint import CheckpointLoader
    CheckpointLoader.register_scheme(prefixes='', force=True)(load_from_local_safe)
    _installed = True
