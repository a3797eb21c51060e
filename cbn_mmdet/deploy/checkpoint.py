"""A CBN model's checkpoint rewritten as the BN model's (what stock MMDetection loads).

Kept: ``state_dict`` (weights and running statistics, the tensors as they were), ``meta``
(with ``meta['cfg']``, the config text that ``DetInferencer(weights=...)`` builds the model
from, replaced by the converted config's) and ``ema_state_dict`` (mmengine's EMAHook: after
its swap at save time ``state_dict`` holds the averaged weights and ``ema_state_dict`` the
trained ones, under ``module.``; converted the same way, its ``steps`` kept).

Removed from each CBN layer: every key whose last component starts with ``cbn_`` - the
counters ``cbn_step`` / ``cbn_skipped`` of layout 3 and the window keys of earlier layouts
(``cbn_mu``, ..., ``cbn_valid``, ``cbn_head``) - and the layer's state_dict version becomes
BatchNorm2d's. ``num_batches_tracked`` is BN's own buffer and stays.

Dropped from the checkpoint: ``cbn_window`` (CBNHook's saved windows), ``optimizer``,
``param_schedulers`` and ``message_hub`` (training state for ``--resume`` of the CBN run; the
message hub's ``runtime_info['cfg']`` would also win over ``meta['cfg']`` in mmengine's
inferencer, and its HistoryBuffers need an allow-list under torch's safe loading) and any other
top-level entry. What is written holds only tensors and plain Python values, so mmengine's own
loader opens it under torch >= 2.6's ``weights_only`` default.
"""
import collections
import re
from typing import Dict, Iterable, List, Tuple

import torch
import torch.nn as nn

from .errors import ConversionError

KEPT = ('meta', 'state_dict', 'ema_state_dict')
EMA_PREFIX = 'module.'  # mmengine's averaged models wrap the model as `.module`
_MODULE_PREFIX = re.compile(r'^module\.')  # mmengine's default revise_keys when loading


def is_cbn_key(key: str) -> bool:
    return key.rsplit('.', 1)[-1].startswith('cbn_')


def cbn_state_layers(state_dict) -> List[str]:
    """Module names that hold ``cbn_*`` keys in ``state_dict`` (the CBN layers it was saved from)."""
    return sorted({k.rsplit('.', 1)[0] if '.' in k else '' for k in state_dict if is_cbn_key(k)})


def model_state_dict(ckpt, where: str):
    """``(state_dict, bare)``: mmengine's ``checkpoint['state_dict']``, or the checkpoint itself
    when it is a bare state_dict (``bare`` True); keys with mmengine's ``module.`` prefix removed."""
    if not isinstance(ckpt, dict):
        raise ConversionError(f'{where}: not a checkpoint (a {type(ckpt).__name__}, not a dict)')
    bare = 'state_dict' not in ckpt
    sd = ckpt if bare else ckpt['state_dict']
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ConversionError(f'{where}: holds no model state_dict (a dict of tensors, at '
                              "checkpoint['state_dict'] or as the whole file)")
    if all(_MODULE_PREFIX.match(k) for k in sd):  # saved from a wrapped model (DDP)
        sd = _with_metadata(collections.OrderedDict((k[len(EMA_PREFIX):], v) for k, v in sd.items()),
                            {k[len(EMA_PREFIX):]: v for k, v in _metadata(sd).items()
                             if k.startswith(EMA_PREFIX)} or None)
    return sd, bare


def _metadata(sd) -> Dict[str, dict]:
    return getattr(sd, '_metadata', None) or {}


def _with_metadata(sd, metadata):
    if metadata is not None:
        sd._metadata = collections.OrderedDict(metadata)
    return sd


def strip_cbn_state(state_dict, layers: Iterable[str], prefix: str = ''
                    ) -> Tuple['collections.OrderedDict', List[str]]:
    """``state_dict`` without the ``cbn_*`` keys of the CBN layers ``layers`` (module names; in
    the state_dict under ``prefix``), those layers' versions set to BatchNorm2d's. Returns the
    new state_dict (same tensors) and the removed keys."""
    names = {prefix + n for n in layers}
    out = collections.OrderedDict()
    removed = []
    for k, v in state_dict.items():
        owner = k.rsplit('.', 1)[0] if '.' in k else ''
        if owner in names and is_cbn_key(k):
            removed.append(k)
        else:
            out[k] = v
    metadata = collections.OrderedDict((k, dict(v)) for k, v in _metadata(state_dict).items())
    for n in names:
        if n in metadata:
            metadata[n]['version'] = nn.BatchNorm2d._version
    return _with_metadata(out, metadata if metadata else None), removed


def plain(obj, where: str):
    """``obj`` (the checkpoint's meta) as plain Python values: numpy scalars and arrays become
    numbers and lists (torch's weights_only loader allows no numpy); other types are an error."""
    if obj is None or isinstance(obj, (bool, int, float, str, bytes, torch.Tensor)):
        return obj
    if isinstance(obj, dict):
        return {k: plain(v, f'{where}[{k!r}]') for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(plain(v, f'{where}[{i}]') for i, v in enumerate(obj))
    try:
        import numpy as np
    except ImportError:
        np = None
    if np is not None and isinstance(obj, np.generic):
        return obj.item()
    if np is not None and isinstance(obj, np.ndarray):
        return obj.tolist()
    raise ConversionError(f'{where} is a {type(obj).__module__}.{type(obj).__name__}, which '
                          'stock MMDetection cannot load safely; remove it from the checkpoint')


def convert_checkpoint(ckpt: dict, layers: Iterable[str], cfg_text: str, where: str,
                       provenance: dict = None) -> Tuple[dict, dict]:
    """The BN model's checkpoint for the CBN checkpoint ``ckpt`` whose CBN layers are ``layers``.

    ``cfg_text`` becomes ``meta['cfg']``; ``provenance`` (plain values) goes to
    ``meta['converted_from']``. Returns ``(checkpoint, report)``, the report with the removed
    keys (``state_dict``, ``ema_state_dict``) and the dropped top-level entries (``dropped``).
    """
    layers = list(layers)
    sd, bare = model_state_dict(ckpt, where)
    new_sd, removed = strip_cbn_state(sd, layers)
    meta = {} if bare else dict(ckpt.get('meta') or {})
    meta = plain(meta, f"{where}: checkpoint['meta']")
    meta['cfg'] = cfg_text
    if provenance:
        meta['converted_from'] = dict(provenance)
    out = {'meta': meta, 'state_dict': new_sd}
    report = {'state_dict': removed, 'ema_state_dict': [],
              'dropped': [] if bare else sorted(k for k in ckpt if k not in KEPT)}
    if not bare and 'ema_state_dict' in ckpt:
        ema = ckpt['ema_state_dict']
        model_keys = {k[len(EMA_PREFIX):] for k in ema if k.startswith(EMA_PREFIX)}
        if model_keys != set(sd):
            diff = sorted(model_keys ^ set(sd))
            raise ConversionError(
                f"{where}: checkpoint['ema_state_dict'] does not hold the model of "
                f"checkpoint['state_dict'] under {EMA_PREFIX!r} ({len(diff)} keys in one only, "
                f'e.g. {diff[:3]})')
        out['ema_state_dict'], report['ema_state_dict'] = strip_cbn_state(ema, layers, EMA_PREFIX)
    return out, report
