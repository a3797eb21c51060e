"""Converters between CBN and plain BatchNorm2d, and layer naming for messages."""
import torch
import torch.nn as nn

from .layer import CrossIterationBatchNorm2d


def _copy_bn_state(src: nn.Module, dst: nn.Module) -> nn.Module:
    with torch.no_grad():
        if src.affine:
            dst.weight.copy_(src.weight)
            dst.bias.copy_(src.bias)
            dst.weight.requires_grad_(src.weight.requires_grad)
            dst.bias.requires_grad_(src.bias.requires_grad)
        if src.track_running_stats and dst.track_running_stats:
            dst.running_mean.copy_(src.running_mean)
            dst.running_var.copy_(src.running_var)
            dst.num_batches_tracked.copy_(src.num_batches_tracked)
    dst.train(src.training)
    return dst


def _replace(module: nn.Module, match, make) -> nn.Module:
    if match(module):
        return make(module)
    for name, child in module.named_children():
        new = _replace(child, match, make)
        if new is not child:
            setattr(module, name, new)
    return module


def _like(src, cls, **kwargs):
    p = src.weight if src.affine else (src.running_mean if src.track_running_stats else None)
    kw = dict(device=p.device, dtype=p.dtype) if p is not None else {}
    return cls(src.num_features, eps=src.eps, momentum=src.momentum, affine=src.affine,
               track_running_stats=src.track_running_stats, **kwargs, **kw)


def convert_cbn_to_bn(module: nn.Module) -> nn.Module:
    """Replace every CBN layer by an ``nn.BatchNorm2d`` with the same parameters and running
    statistics (identical eval outputs). Returns the module (a new one if ``module`` is a CBN)."""
    return _replace(module, lambda m: isinstance(m, CrossIterationBatchNorm2d),
                    lambda m: _copy_bn_state(m, _like(m, nn.BatchNorm2d)))


def convert_bn_to_cbn(module: nn.Module, window: int = 4, burnin=None,
                      compensate: bool = True) -> nn.Module:
    """Replace every ``nn.BatchNorm2d`` (and SyncBatchNorm) by a CBN layer with the same
    parameters and running statistics. CBN options are passed on and validated."""
    def match(m):
        return isinstance(m, (nn.BatchNorm2d, nn.SyncBatchNorm)) and \
            not isinstance(m, CrossIterationBatchNorm2d)
    return _replace(module, match, lambda m: _copy_bn_state(
        m, _like(m, CrossIterationBatchNorm2d, window=window, burnin=burnin, compensate=compensate)))


def name_cbn_layers(model: nn.Module) -> int:
    """Give every CBN layer its qualified name for warnings and errors; returns how many."""
    count = 0
    for name, m in model.named_modules():
        if isinstance(m, CrossIterationBatchNorm2d):
            m.layer_name = name or type(m).__name__
            count += 1
    return count
