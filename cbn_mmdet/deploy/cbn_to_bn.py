"""Files in, files out: a CBN model's config and checkpoint as a stock MMDetection BN model's.

:func:`cbn_to_bn` checks before it writes anything:

- the checkpoint is a CBN model's: it holds CBN state (``cbn_*`` keys);
- it is this config's: it loads into the model built from the config with no missing or
  unexpected key and no shape mismatch;

and after converting (with cbn_mmdet still imported, so anything of ours left would build):

- the converted config builds a model with no cbn_mmdet module, whose norm layer at each of
  the CBN layers' places has the options of :func:`convert_cbn_to_bn` of the loaded model
  (class, eps, momentum, affine, track_running_stats, requires_grad);
- the converted state_dict loads into it strictly, and the written checkpoint opens with
  ``torch.load(weights_only=True)`` (what mmengine's loader does under torch >= 2.6).

What changes in each file: :mod:`cbn_mmdet.deploy.config`, :mod:`cbn_mmdet.deploy.checkpoint`.
"""
import os
import os.path as osp
from dataclasses import dataclass, field
from typing import Dict, List

import torch
import torch.nn as nn

from ..cbn import CrossIterationBatchNorm2d, convert_cbn_to_bn
from .checkpoint import cbn_state_layers, convert_checkpoint, model_state_dict
from .config import SYNC_CBN_AS, convert_config_dict, find_types_of_ours
from .errors import ConversionError


@dataclass
class Converted:
    config: str                      # the written files
    checkpoint: str
    cbn_layers: List[str]            # module names of the CBN layers, now BN
    config_changes: List[str]        # one line per change in the config
    removed_keys: Dict[str, List[str]] = field(default_factory=dict)  # per state_dict
    dropped: List[str] = field(default_factory=list)  # top-level checkpoint entries


def _first(items, n=5) -> str:
    items = list(items)
    return ', '.join(items[:n]) + (f', ... ({len(items)} in all)' if len(items) > n else '')


def load_config(path: str):
    from mmengine.config import Config
    if not osp.isfile(path):
        raise ConversionError(f'{path}: no such config file')
    try:
        return Config.fromfile(path)
    except Exception as e:
        raise ConversionError(f'{path}: cannot be read as an mmengine config '
                              f'({type(e).__name__}: {e})') from e


def load_checkpoint_file(path: str):
    from ..engine.checkpoint import load_local_checkpoint
    if not osp.isfile(path):
        raise ConversionError(f'{path}: no such checkpoint file')
    try:
        return load_local_checkpoint(path, map_location='cpu')
    except Exception as e:
        raise ConversionError(f'{path}: cannot be loaded as a checkpoint '
                              f'({type(e).__name__}: {e})') from e


def build_model(cfg, where: str) -> nn.Module:
    """The model of ``cfg`` (built with mmdet's registries, no weights loaded or initialized)."""
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    register_all_modules()
    if 'model' not in cfg:
        raise ConversionError(f'{where}: has no `model` entry')
    try:
        return MODELS.build(cfg.model)
    except Exception as e:
        raise ConversionError(f'{where}: its model does not build ({type(e).__name__}: {e})') from e


def cbn_layer_names(model: nn.Module) -> List[str]:
    return [n for n, m in model.named_modules() if isinstance(m, CrossIterationBatchNorm2d)]


def check_is_cbn_checkpoint(state_dict, layers, config: str, checkpoint: str) -> None:
    saved = cbn_state_layers(state_dict)
    if not saved:
        what = ('and the config builds no CBN layer either: nothing to convert' if not layers else
                f'although {config} builds {len(layers)} CBN layers: a BN model\'s checkpoint '
                '(which loads into stock MMDetection as it is), or the wrong file')
        raise ConversionError(f'{checkpoint}: not a CBN model\'s checkpoint - its state_dict holds '
                              f'no CBN state (no cbn_step / cbn_skipped key) {what}')
    if not layers:
        raise ConversionError(f'{config} does not match {checkpoint}: the config builds no CBN '
                              f'layer, the checkpoint holds CBN state for {len(saved)} layers '
                              f'({_first(saved, 3)})')


def check_loads(model: nn.Module, state_dict, config: str, checkpoint: str) -> None:
    """The state_dict loads into ``model`` with no missing/unexpected key or shape mismatch."""
    try:
        res = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as e:  # shape mismatches are raised whatever `strict` says
        lines = [x.strip() for x in str(e).splitlines()[1:] if x.strip()]
        raise ConversionError(f'{config} does not match {checkpoint}: {len(lines)} tensors have '
                              f'another shape in the model ({_first(lines, 3)})') from e
    problems = []
    if res.missing_keys:
        problems.append(f'{len(res.missing_keys)} keys of the model are missing from the '
                        f'checkpoint ({_first(res.missing_keys)})')
    if res.unexpected_keys:
        problems.append(f'{len(res.unexpected_keys)} keys of the checkpoint are not in the '
                        f'model ({_first(res.unexpected_keys)})')
    if problems:
        raise ConversionError(f'{config} does not match {checkpoint}: ' + '; '.join(problems))


def _norm_options(m: nn.Module) -> dict:
    out = dict(cls=type(m).__name__, num_features=m.num_features, eps=m.eps,
               momentum=m.momentum, affine=m.affine, track_running_stats=m.track_running_stats)
    if m.affine:
        out.update(requires_grad=(m.weight.requires_grad, m.bias.requires_grad))
    return out


def check_same_norms(reference: nn.Module, model: nn.Module, layers, where: str) -> None:
    """At each of ``layers`` ``model`` has the norm layer ``reference`` (the CBN model through
    :func:`convert_cbn_to_bn`) has, up to SyncBN for BN (``--sync-cbn-as SyncBN``)."""
    bad = []
    for name in layers:
        want = _norm_options(reference.get_submodule(name))
        try:
            got = _norm_options(model.get_submodule(name))
        except AttributeError:
            got = None
        if got is not None and got['cls'] == 'SyncBatchNorm':
            got['cls'] = 'BatchNorm2d'
        if got != want:
            bad.append(f'{name}: {got} instead of {want}')
    if bad:
        raise ConversionError(f'{where}: the converted config builds other norm layers than the '
                              f'CBN layers converted to BN ({_first(bad, 2)})')


def _refuse_overwriting(src: str, dst: str) -> None:
    if osp.exists(dst) and osp.samefile(src, dst):
        raise ConversionError(f'{dst}: is the input file; choose another OUT_DIR')


def cbn_to_bn(config: str, checkpoint: str, out_dir: str, sync_cbn_as: str = SYNC_CBN_AS
              ) -> Converted:
    """Write ``OUT_DIR/<config name>`` and ``OUT_DIR/<checkpoint name>`` for stock MMDetection.
    Raises :class:`ConversionError` (nothing written) for a checkpoint that is not a CBN model's
    or does not match the config."""
    import cbn_mmdet
    from mmengine.config import Config
    cfg = load_config(config)
    ckpt = load_checkpoint_file(checkpoint)
    state_dict, _ = model_state_dict(ckpt, checkpoint)

    cbn_model = build_model(cfg, config)
    layers = cbn_layer_names(cbn_model)
    check_is_cbn_checkpoint(state_dict, layers, config, checkpoint)
    check_loads(cbn_model, state_dict, config, checkpoint)

    new_dict, changes = convert_config_dict(cfg.to_dict(), sync_cbn_as, where=config)
    left = find_types_of_ours(new_dict)
    if left:  # a bug of the converter, not of the input
        raise ConversionError(f'{config}: types of cbn_mmdet left after converting at {_first(left)}')
    new_cfg = Config(new_dict)
    bn_model = build_model(new_cfg, f'the converted {config}')
    ours = [n for n, m in bn_model.named_modules() if type(m).__module__.split('.')[0] == 'cbn_mmdet']
    if ours:
        raise ConversionError(f'{config}: the converted config still builds cbn_mmdet modules '
                              f'({_first(ours)}); it cannot run in stock MMDetection')
    check_same_norms(convert_cbn_to_bn(cbn_model), bn_model, layers, config)

    cfg_text = new_cfg.pretty_text
    provenance = dict(config=osp.basename(config), checkpoint=osp.basename(checkpoint),
                      tool=f'cbn_mmdet {cbn_mmdet.__version__} tools/model_converters/cbn_to_bn.py',
                      sync_cbn_as=sync_cbn_as)
    new_ckpt, report = convert_checkpoint(ckpt, layers, cfg_text, checkpoint, provenance)
    try:
        bn_model.load_state_dict(new_ckpt['state_dict'], strict=True)
    except RuntimeError as e:
        raise ConversionError(f'{checkpoint}: the converted state_dict does not load into the '
                              f'converted config\'s model: {e}') from e

    out_cfg = osp.join(out_dir, osp.basename(config))
    out_ckpt = osp.join(out_dir, osp.basename(checkpoint))
    _refuse_overwriting(config, out_cfg)
    _refuse_overwriting(checkpoint, out_ckpt)
    os.makedirs(out_dir, exist_ok=True)
    if out_cfg.endswith('.py'):
        with open(out_cfg, 'w', encoding='utf-8') as f:
            f.write(cfg_text)  # what Config.dump writes, formatted once
    else:
        new_cfg.dump(out_cfg)
    tmp = out_ckpt + '.tmp'
    torch.save(new_ckpt, tmp)
    try:
        torch.load(tmp, map_location='cpu', weights_only=True)
    except Exception as e:
        os.remove(tmp)
        raise ConversionError(f'{checkpoint}: the converted checkpoint does not open with '
                              f'torch.load(weights_only=True) ({type(e).__name__}: {e})') from e
    os.replace(tmp, out_ckpt)
    return Converted(config=out_cfg, checkpoint=out_ckpt, cbn_layers=layers,
                     config_changes=changes,
                     removed_keys={k: report[k] for k in ('state_dict', 'ema_state_dict')},
                     dropped=report['dropped'])
