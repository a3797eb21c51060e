"""Stock MMDetection on a converted model, in a process where cbn_mmdet cannot be imported.

Run as ``python -I stock_mmdet_check.py CONFIG CHECKPOINT INPUTS OUTPUTS WORK_DIR`` from a
directory outside the repo (tests/tools/test_cbn_to_bn.py does): a ``sys.meta_path`` finder
makes every import of ``cbn_mmdet`` (and its submodules) raise ImportError, and the report
says it acted. Then, with mmdet alone: build the model from CONFIG, load CHECKPOINT strictly
with mmengine's own loader, save the eval-mode outputs on INPUTS (a file of
:func:`fixed_inputs`) to OUTPUTS, build DetInferencer from the checkpoint alone (its
``meta['cfg']``), and evaluate with ``Runner.test`` (predictions dumped under WORK_DIR). The last
line of stdout is ``RESULT <json>``.

Imported (not run), it only provides :func:`fixed_inputs` and :func:`eval_outputs`, which the
test uses on the CBN model in its own process.
"""
import json
import sys

BLOCKED = 'cbn_mmdet'


class BlockCbnMmdet:
    """A meta path finder placed first: ``cbn_mmdet`` and ``cbn_mmdet.*`` raise ImportError."""

    def __init__(self):
        self.attempts = []

    def find_spec(self, name, path=None, target=None):
        if name == BLOCKED or name.startswith(BLOCKED + '.'):
            self.attempts.append(name)
            raise ImportError(f'{name} is blocked in this process (stock MMDetection check)')
        return None


def fixed_inputs(seed=0):
    """``(images, metainfo)``: two 128x128 images, as after mmdet's data preprocessor."""
    import torch
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(2, 3, 128, 128, generator=g)
    meta = dict(img_shape=(128, 128), ori_shape=(128, 128), pad_shape=(128, 128),
                batch_input_shape=(128, 128), scale_factor=(1.0, 1.0))
    return images, meta


def eval_outputs(model, images, meta) -> dict:
    """Eval-mode outputs through every norm layer of a two-stage detector: the FPN levels, the
    RoI head's class scores, box deltas and mask logits for the RPN's proposals."""
    import torch
    from mmdet.structures import DetDataSample
    samples = [DetDataSample(metainfo=dict(meta)) for _ in range(images.shape[0])]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same reduction order in both processes
    try:
        model.eval()
        with torch.no_grad():
            feats = model.extract_feat(images)
            (roi,) = model._forward(images, samples)
    finally:
        torch.set_num_threads(threads)
    out = {f'fpn{i}': f for i, f in enumerate(feats)}
    out.update({f'roi{i}': t for i, t in enumerate(roi)})
    return out


def main(argv):
    config, checkpoint, inputs_path, outputs_path, work_dir = argv
    import importlib.util
    report = {'findable_before_blocking': importlib.util.find_spec(BLOCKED) is not None}
    blocker = BlockCbnMmdet()
    sys.meta_path.insert(0, blocker)
    try:
        import cbn_mmdet  # noqa: F401
        report['import_cbn_mmdet'] = 'imported'
    except ImportError as e:
        report['import_cbn_mmdet'] = f'ImportError: {e}'

    import torch
    from mmengine.config import Config
    from mmengine.runner import Runner, load_checkpoint
    from mmdet.apis import DetInferencer
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    register_all_modules()

    cfg = Config.fromfile(config)
    model = MODELS.build(cfg.model)
    ckpt = load_checkpoint(model, checkpoint, map_location='cpu', strict=True)  # mmengine's loader
    res = model.load_state_dict(ckpt['state_dict'], strict=True)
    report['strict_load'] = dict(missing=list(res.missing_keys), unexpected=list(res.unexpected_keys))
    report['norm_layers'] = sorted({type(m).__name__ for m in model.modules()
                                    if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)})
    images, meta = torch.load(inputs_path)
    outputs = eval_outputs(model, images, meta)
    torch.save(outputs, outputs_path)

    inferencer = DetInferencer(weights=checkpoint, device='cpu', show_progress=False)
    again = eval_outputs(inferencer.model, images, meta)
    report['inferencer_same_outputs'] = all(torch.equal(again[k], outputs[k]) for k in outputs)

    cfg.work_dir = work_dir
    cfg.load_from = checkpoint
    evaluators = cfg.test_evaluator if isinstance(cfg.test_evaluator, list) else [cfg.test_evaluator]
    cfg.test_evaluator = list(evaluators) + [
        dict(type='DumpDetResults', out_file_path=f'{work_dir}/predictions.pkl')]
    runner = Runner.from_cfg(cfg)
    report['metrics'] = {k: float(v) for k, v in runner.test().items()}
    report['blocked_attempts'] = blocker.attempts
    report['cbn_mmdet_modules'] = sorted(m for m in sys.modules if m.split('.')[0] == BLOCKED)
    print('RESULT ' + json.dumps(report), flush=True)


if __name__ == '__main__':
    main(sys.argv[1:])
