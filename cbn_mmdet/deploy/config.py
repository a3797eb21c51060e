"""A CBN training config rewritten for stock MMDetection (no cbn_mmdet installed).

The fully merged config tree is walked generically (dicts and lists anywhere: model,
dataloaders, evaluators, hooks, top-level variables), and every dict whose ``type`` is
something cbn_mmdet registers is handled by what that type is:

- a CBN norm layer (``CBN``, ``CrossIterationBatchNorm2d``, ``SyncCBN``,
  ``SyncCrossIterationBatchNorm2d``) becomes ``BN``, keeping every option BatchNorm2d shares
  (eps, momentum, affine, track_running_stats) and mmcv's ``requires_grad``, and dropping the
  CBN-only ones (those of the CBN class's signature that the BN class lacks: window, burnin,
  compensate; for SyncCBN also process_group). SyncCBN becomes ``BN`` too by default (see
  :data:`SYNC_CBN_AS`); ``sync_cbn_as='SyncBN'`` keeps it synchronized (and its process_group).
- a hook of ours (CBNHook, PreciseStatsHook, SeedPerIterationHook, CBNStatsProbeHook) is
  dropped: all of them act during training only (PreciseStatsHook: after the last training
  epoch, so its statistics are already in that checkpoint, and before validation *during
  training*; nothing at test time).
- any other type of ours has no stock equivalent: :class:`ConversionError` naming where it is.
  (Today there is none: the digits dataset is mmdet's own ``CocoDataset`` with
  ``metainfo=dict(classes=...)`` over COCO-format json, and cbn_mmdet.datasets registers no
  dataset, transform or metric.)

``custom_imports`` loses ``cbn_mmdet`` (and its submodules), and goes when nothing is left.
"""
import copy
import inspect
from typing import Any, Dict, List, Tuple

import torch.nn as nn

from ..cbn import CrossIterationBatchNorm2d, SyncCrossIterationBatchNorm2d
from .errors import ConversionError

PACKAGE = 'cbn_mmdet'
# SyncCBN -> BN: the converted model is for evaluation and deployment, where SyncBN and BN are
# the same computation (running statistics), SyncBN needs a process group to train and a GPU,
# and MMDetection's own inference (DetInferencer) reverts SyncBN to BN anyway. The state_dict
# keys are the same, so a config that fine-tunes with SyncBN only changes the norm type.
SYNC_CBN_AS = 'BN'
_TARGETS = {'BN': nn.BatchNorm2d, 'SyncBN': nn.SyncBatchNorm}
_DROP = object()


def _ours(obj) -> bool:
    return getattr(obj, '__module__', '').split('.')[0] == PACKAGE


def _all_registries():
    import mmengine.registry as reg
    todo = [v for v in vars(reg).values() if isinstance(v, reg.Registry)]
    seen = []
    while todo:
        r = todo.pop()
        if any(r is s for s in seen):
            continue
        seen.append(r)
        todo.extend(r.children.values())
    return seen


def registered_types() -> Dict[str, Any]:
    """Every name that cbn_mmdet registers in an mmengine/mmdet registry -> the object (after
    importing every part of cbn_mmdet that registers something), plus the CBN classes' names."""
    import cbn_mmdet  # noqa: F401  (registers the norm layers and, through .engine, the hooks)
    import cbn_mmdet.datasets  # noqa: F401
    import cbn_mmdet.engine  # noqa: F401
    out = {}
    for registry in _all_registries():
        for name, obj in registry.module_dict.items():
            if _ours(obj):
                out[name] = obj
    for cls in (CrossIterationBatchNorm2d, SyncCrossIterationBatchNorm2d):
        out.setdefault(cls.__name__, cls)
    return out


def _resolve(type_, ours: Dict[str, Any]):
    """The cbn_mmdet object a config ``type`` names, or None when it is not ours."""
    if isinstance(type_, str):
        return ours.get(type_.rsplit('.', 1)[-1])  # 'mmdet.CBN' is ours too
    if isinstance(type_, type) and _ours(type_):
        return type_
    return None


def _params(cls) -> set:
    return set(inspect.signature(cls.__init__).parameters) - {'self'}


def bn_norm_cfg(node: dict, cls, sync_cbn_as: str = SYNC_CBN_AS) -> dict:
    """The BN (or SyncBN) norm_cfg for the CBN norm_cfg ``node`` of class ``cls``."""
    target = sync_cbn_as if issubclass(cls, SyncCrossIterationBatchNorm2d) else 'BN'
    cbn_only = _params(cls) - _params(_TARGETS[target])  # window, burnin, compensate, ...
    out = {k: copy.deepcopy(v) for k, v in node.items() if k not in cbn_only}
    out['type'] = target
    return out


def convert_config_dict(cfg: dict, sync_cbn_as: str = SYNC_CBN_AS, where: str = 'the config'
                        ) -> Tuple[dict, List[str]]:
    """``cfg`` (a plain dict: ``Config.to_dict()``) for stock MMDetection, and a list of what
    was changed (one line each). ``where`` names the config in errors."""
    if sync_cbn_as not in _TARGETS:
        raise ValueError(f'sync_cbn_as must be one of {sorted(_TARGETS)}, got {sync_cbn_as!r}')
    ours = registered_types()
    changes: List[str] = []
    hook_base = _hook_base()

    def walk(node, path):
        if isinstance(node, dict):
            obj = _resolve(node.get('type'), ours)
            if obj is not None:
                if isinstance(obj, type) and issubclass(obj, CrossIterationBatchNorm2d):
                    new = bn_norm_cfg(node, obj, sync_cbn_as)
                    dropped = sorted(set(node) - set(new))
                    changes.append(f'{path}: {node["type"]!r} -> {new["type"]!r}'
                                   + (f' (dropped {", ".join(dropped)})' if dropped else ''))
                    return new
                if isinstance(obj, type) and issubclass(obj, hook_base):
                    changes.append(f'{path}: dropped hook {node["type"]!r} (cbn_mmdet)')
                    return _DROP
                raise ConversionError(
                    f'{where}: {path} has type {node["type"]!r}, which is cbn_mmdet\'s '
                    f'({obj.__module__}.{getattr(obj, "__name__", obj)}) and has no stock '
                    'MMDetection equivalent that this converter knows')
            out = {}
            for k, v in node.items():
                new = walk(v, f'{path}.{k}' if path else str(k))
                if new is not _DROP:
                    out[k] = new
            return out
        if isinstance(node, (list, tuple)):
            items = [walk(v, f'{path}[{i}]') for i, v in enumerate(node)]
            items = [v for v in items if v is not _DROP]
            return type(node)(items)
        return node

    out = walk(cfg, '')
    _drop_custom_imports(out, changes)
    return out, changes


def _hook_base():
    from mmengine.hooks import Hook
    return Hook


def _is_ours(module_name) -> bool:
    return isinstance(module_name, str) and module_name.split('.')[0] == PACKAGE


def _drop_custom_imports(cfg: dict, changes: List[str]) -> None:
    ci = cfg.get('custom_imports')
    if not isinstance(ci, dict):
        return
    imports = ci.get('imports', [])
    listed = [imports] if isinstance(imports, str) else list(imports)
    kept = [m for m in listed if not _is_ours(m)]
    if len(kept) == len(listed):
        return
    gone = [m for m in listed if _is_ours(m)]
    if kept:
        cfg['custom_imports'] = dict(ci, imports=kept)
        changes.append(f'custom_imports: removed {", ".join(gone)} (kept {", ".join(kept)})')
    else:
        del cfg['custom_imports']
        changes.append(f'custom_imports: removed ({", ".join(gone)} was all it imported)')


def find_types_of_ours(cfg: dict) -> List[str]:
    """Paths in ``cfg`` whose ``type`` is cbn_mmdet's (empty for a converted config)."""
    ours = registered_types()
    found = []

    def walk(node, path):
        if isinstance(node, dict):
            if _resolve(node.get('type'), ours) is not None:
                found.append(path)
            for k, v in node.items():
                walk(v, f'{path}.{k}' if path else str(k))
        elif isinstance(node, (list, tuple)):
            for i, v in enumerate(node):
                walk(v, f'{path}[{i}]')
    walk(cfg, '')
    ci = cfg.get('custom_imports') or {}
    imports = ci.get('imports', []) if isinstance(ci, dict) else []
    if any(_is_ours(m) for m in ([imports] if isinstance(imports, str) else imports)):
        found.append('custom_imports')
    return found
