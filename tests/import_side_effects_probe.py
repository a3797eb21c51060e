"""What code that does not use CBN sees, in a fresh process; run by
tests/test_import_side_effects.py as ``python tests/import_side_effects_probe.py MODE DIR OUT``.

MODE: ``none`` (mmengine/mmdet alone) or ``plugin`` (``import cbn_mmdet`` first; then everything
again in the report's ``cbn`` section once a CBN layer is built, so that whatever the layer
installs on this torch is in place, and in ``tracked`` with every wrapper of the tracker in
place). DIR holds the checkpoint files written by the test; OUT receives the JSON report.
Everything in it is built from values, never from ids or addresses, so that two processes can
be compared entry by entry.
"""
import hashlib
import json
import os
import sys
import warnings


def digest(obj):
    """A canonical, comparable description of a loaded object (tensors by dtype, shape, class
    and a hash of their bytes)."""
    import numpy as np
    import torch
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous().reshape(-1)
        raw = t.view(torch.uint8).numpy().tobytes() if t.numel() else b''
        return ['tensor', type(obj).__name__, str(obj.dtype), list(obj.shape), obj.requires_grad,
                hashlib.sha1(raw).hexdigest()]
    if isinstance(obj, np.ndarray):
        return ['ndarray', str(obj.dtype), list(obj.shape), hashlib.sha1(obj.tobytes()).hexdigest()]
    if isinstance(obj, dict):
        return [type(obj).__name__, [[repr(k), digest(v)] for k, v in obj.items()]]
    if isinstance(obj, (list, tuple)):
        return [type(obj).__name__, [digest(v) for v in obj]]
    if isinstance(obj, (str, int, float, bool, type(None), bytes, np.generic)):
        return [type(obj).__name__, repr(obj)]
    if callable(obj) and hasattr(obj, '__qualname__'):
        return ['callable', getattr(obj, '__module__', None), obj.__qualname__]
    if hasattr(obj, '__dict__'):
        return ['object', f'{type(obj).__module__}.{type(obj).__qualname__}', digest(vars(obj))]
    return ['value', type(obj).__qualname__, repr(obj)]


def outcome(fn):
    """``['ok', digest(result)]`` or ``['raised', exception type, message]``."""
    try:
        return ['ok', digest(fn())]
    except Exception as e:  # noqa: BLE001  the exception is the result compared
        return ['raised', f'{type(e).__module__}.{type(e).__qualname__}', str(e)]


def where(fn):
    """The file (relative to its package) and name of the code that runs for ``fn``."""
    code = getattr(fn, '__code__', None)
    if code is None:
        return repr(fn)
    parts = code.co_filename.replace(os.sep, '/').split('/')
    pkg = next((i for i, p in enumerate(parts) if p in ('torch', 'mmengine', 'cbn_mmdet')), -1)
    return '/'.join(parts[pkg:]) + ':' + code.co_name


def plain_model():
    import torch
    import torch.nn as nn
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Sequential(nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, 2))


# ---------------------------------------------------------------- what is patched
def patched_state():
    import torch
    import torch.utils.checkpoint as tc
    from mmengine.runner.checkpoint import CheckpointLoader
    out = {'saved_tensors_hooks.__enter__': where(torch.autograd.graph.saved_tensors_hooks.__enter__),
           'saved_tensors_hooks.__exit__': where(torch.autograd.graph.saved_tensors_hooks.__exit__)}
    if hasattr(tc, 'CheckpointFunction'):
        out['CheckpointFunction.backward'] = where(tc.CheckpointFunction.backward)
    out['checkpoint loaders'] = {p: where(f) for p, f in CheckpointLoader._schemes.items()}
    import importlib
    for name in ('mmengine.model', 'mmengine.model.utils', 'mmengine.runner.runner',
                 'mmengine._strategy.distributed'):
        out[f'{name}.convert_sync_batchnorm'] = where(
            importlib.import_module(name).convert_sync_batchnorm)
    return out


def global_state():
    import logging

    import torch
    return {
        'warnings.filters': [repr(f) for f in warnings.filters],
        'torch': [torch.get_default_dtype().__repr__(), torch.get_float32_matmul_precision(),
                  torch.are_deterministic_algorithms_enabled(), torch.is_grad_enabled(),
                  torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
                  torch.get_num_threads()],
        'loggers': {n: logging.getLogger(n).level for n in ('', 'mmengine', 'py.warnings')},
        'environ': sorted(os.environ),
    }


def registries(with_mmdet):
    """``{registry: {name: registered object}}`` for mmengine's MODELS and HOOKS (with mmcv's
    layers in them) and, ``with_mmdet``, again once all of mmdet is registered, with mmdet's."""
    from mmengine.registry import HOOKS, MODELS

    def entries(regs):
        return {name: {k: f'{v.__module__}.{v.__qualname__}' for k, v in reg.module_dict.items()}
                for name, reg in regs}
    out = entries((('mmengine.MODELS', MODELS), ('mmengine.HOOKS', HOOKS)))
    if with_mmdet:
        from mmdet.registry import HOOKS as DET_HOOKS
        from mmdet.registry import MODELS as DET_MODELS
        from mmdet.utils import register_all_modules
        register_all_modules(init_default_scope=False)
        out['with mmdet'] = entries((('mmengine.MODELS', MODELS), ('mmengine.HOOKS', HOOKS),
                                     ('mmdet.MODELS', DET_MODELS), ('mmdet.HOOKS', DET_HOOKS)))
    return out


# ---------------------------------------------------------------- checkpoint loading
CHECKPOINTS = ('plain_state_dict', 'release', 'mmengine_trained', 'other_type', 'corrupt', 'missing',
               'cbn_trained')


def loading(ckpt_dir):
    from mmengine.runner import load_checkpoint
    from mmengine.runner.checkpoint import CheckpointLoader
    out = {}
    for name in CHECKPOINTS:
        path = os.path.join(ckpt_dir, name + '.pth')
        out[f'{name}: CheckpointLoader'] = outcome(
            lambda: CheckpointLoader.load_checkpoint(path, map_location='cpu'))
        model = plain_model()

        def into_model():
            ckpt = load_checkpoint(model, path, map_location='cpu', strict=False)
            return [ckpt, model.state_dict()]
        out[f'{name}: load_checkpoint'] = outcome(into_model)
    return out


# ---------------------------------------------------------------- torch's checkpointing
def training(mode):
    """One forward/backward of the model without CBN under one of torch's saved-tensor
    mechanisms: outputs, gradients, buffers and the warnings raised, bit for bit."""
    import torch
    import torch.utils.checkpoint as tc
    model = plain_model()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1), requires_grad=True)
    packed = []

    def pack(t):
        packed.append(list(t.shape))
        return t

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        if mode == 'reentrant':
            out = tc.checkpoint(model, x, use_reentrant=True)
        elif mode == 'non_reentrant':
            out = tc.checkpoint(model, x, use_reentrant=False)
        elif mode == 'use_reentrant_not_given':
            out = tc.checkpoint(model, x)
        elif mode == 'sequential':
            out = tc.checkpoint_sequential(model, 2, x, use_reentrant=False)
        elif mode == 'save_on_cpu':
            with torch.autograd.graph.save_on_cpu():
                out = model(x)
        elif mode == 'own_hooks':
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out = model(x)
        elif mode == 'nested':
            with torch.autograd.graph.save_on_cpu():
                with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                    out = tc.checkpoint(model, x, use_reentrant=False)
        else:
            out = model(x)
        out.square().sum().backward()
    return digest({'out': out, 'x.grad': x.grad, 'state': model.state_dict(),
                   'grads': [p.grad for p in model.parameters()], 'packed': packed,
                   'warnings': [[w.category.__name__, str(w.message), os.path.basename(w.filename),
                                 w.lineno] for w in caught]})


def checkpointing_errors():
    """Errors raised through torch's saved-tensor hooks and checkpoint backward."""
    import torch
    import torch.utils.checkpoint as tc
    out = {}

    def grad_through_reentrant():
        x = torch.randn(3, requires_grad=True)
        y = tc.checkpoint(torch.sin, x, use_reentrant=True)
        return torch.autograd.grad(y.sum(), x)
    out['autograd.grad through reentrant'] = outcome(grad_through_reentrant)

    def hooks_while_disabled():
        with torch.autograd.graph.disable_saved_tensors_hooks('no saved-tensor hooks here'):
            with torch.autograd.graph.save_on_cpu():
                return 'entered'
    out['hooks while disabled'] = outcome(hooks_while_disabled)

    def recompute_saves_more():
        calls = []

        def f(x):
            calls.append(1)
            y = x.sin()
            return y * 2 if len(calls) > 1 else y.exp() * y  # the recomputation saves less
        x = torch.randn(3, requires_grad=True)
        tc.checkpoint(f, x, use_reentrant=False).sum().backward()
        return 'no error'
    out['recomputation differs'] = outcome(recompute_saves_more)

    def entered_values():
        """What ``with ... as value`` gives and what the methods are called."""
        got = []
        for cm in (torch.autograd.graph.save_on_cpu(),
                   torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)):
            with cm as value:
                got.append('the manager' if value is cm else repr(value))
        cls = torch.autograd.graph.saved_tensors_hooks
        got += [cls.__enter__.__name__, cls.__exit__.__name__, cls.__enter__.__qualname__]
        if hasattr(tc, 'CheckpointFunction'):
            got.append(tc.CheckpointFunction.backward.__qualname__)
        return got
    out['entered values'] = outcome(entered_values)

    def raise_inside_hooks():
        try:
            with torch.autograd.graph.save_on_cpu():
                raise KeyError('inside')
        except KeyError:
            pass
        return training('plain')  # nothing left behind by the failed block
    out['raise inside hooks'] = outcome(raise_inside_hooks)
    return out


# ---------------------------------------------------------------- convert_sync_batchnorm
def sync_bn_conversion():
    import importlib

    import torch.nn as nn
    out = {}
    convs = {name: importlib.import_module(name).convert_sync_batchnorm
             for name in ('mmengine.model', 'mmengine.runner.runner', 'mmengine._strategy.distributed')}
    convs['torch'] = nn.SyncBatchNorm.convert_sync_batchnorm
    for name, convert in convs.items():
        def converted():
            model = plain_model()
            params = list(model.parameters())
            res = convert(model)
            return {'types': [[n, f'{type(m).__module__}.{type(m).__qualname__}']
                              for n, m in res.named_modules()],
                    'state': res.state_dict(), 'same parameters': [
                        p is q for p, q in zip(params, res.parameters())],
                    'same object': res is model}
        out[name] = outcome(converted)
        out[name + ' (bogus implementation)'] = outcome(lambda: convert(plain_model(), 'bogus'))
        out[name + ' (None)'] = outcome(lambda: convert(None))
        out[name + ' (name, doc)'] = [getattr(convert, '__name__', None), getattr(convert, '__doc__', None)]
    return out


TRAINING_MODES = ('plain', 'reentrant', 'non_reentrant', 'use_reentrant_not_given', 'sequential',
                  'save_on_cpu', 'own_hooks', 'nested')


def main(mode, ckpt_dir, out_path):
    import torch
    report = {'mode': mode, 'torch': torch.__version__}
    if mode == 'plugin':
        import cbn_mmdet
        from cbn_mmdet.cbn import compat
        report['tracker at import'] = compat.tracker_installed()
    import mmcv.cnn  # noqa: F401
    import mmengine.runner  # noqa: F401  (what any mmdet program imports)
    report['global'] = global_state()
    report['patched'] = patched_state()
    report['registries'] = registries(with_mmdet=mode == 'none')
    report['loading'] = loading(ckpt_dir)
    report['training'] = {m: training(m) for m in TRAINING_MODES}
    report['errors'] = checkpointing_errors()
    report['sync_bn'] = sync_bn_conversion()
    if mode == 'plugin':
        # a CBN layer exists from here on: whatever it installs on this torch is in place
        cbn_mmdet.CrossIterationBatchNorm2d(4)
        report['tracker after a layer is built'] = compat.tracker_installed()
        compat.ensure_tracker()
        report['tracker'] = compat.tracker_installed()
        report['cbn'] = {'patched': patched_state(), 'loading': loading(ckpt_dir),
                         'training': {m: training(m) for m in TRAINING_MODES},
                         'errors': checkpointing_errors(), 'sync_bn': sync_bn_conversion()}
        # both fallbacks chosen, as on a torch without either private API: every wrapper in
        # place (on any torch), still nothing changes
        compat.resolve(missing=compat.PRIVATE_APIS)
        report['tracked'] = {'patched': patched_state(),
                             'training': {m: training(m) for m in TRAINING_MODES},
                             'errors': checkpointing_errors()}
        compat.resolve()
        # our runners' scope: every mmengine checkpoint, under safe loading
        from cbn_mmdet.engine import install_checkpoint_loader
        install_checkpoint_loader(any_checkpoint=True)
        report['loading in our runners'] = loading(ckpt_dir)
    with open(out_path, 'w') as f:
        json.dump(report, f)


if __name__ == '__main__':
    main(*sys.argv[1:])
