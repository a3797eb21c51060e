"""Evaluate a checkpoint: ``python tools/test.py CONFIG CHECKPOINT [--out results.pkl] ...``.

Same core options as MMDetection's tools/test.py (``--out``, ``--show``, ``--show-dir``,
``--wait-time``, ``--tta``, ``--cfg-options``, ``--work-dir``, ``--launcher``); prints the
metrics of the config's test_evaluator (COCO bbox/segm mAP for our configs).
"""
import argparse

from cbn_mmdet.engine.launch import add_common_args, build_runner, load_config, shutdown


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Test (evaluate) a detector checkpoint')
    parser.add_argument('config', help='test config file')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--out', help='dump raw predictions to this .pkl file')
    parser.add_argument('--show', action='store_true', help='show prediction results')
    parser.add_argument('--show-dir',
                        help='directory where painted images will be saved (relative paths are '
                             'under work_dir/timestamp/, as in mmdet)')
    parser.add_argument('--wait-time', type=float, default=2, help='the interval of show (s)')
    parser.add_argument('--tta', action='store_true', help='test-time augmentation (if configured)')
    add_common_args(parser)
    return parser.parse_args(argv)


def apply_test_args(cfg, args):
    """The checkpoint, --show/--show-dir/--wait-time, --tta and --out, as MMDetection's
    tools/test.py applies them (the visualization through mmdet's own
    ``trigger_visualization_hook``: it needs ``default_hooks.visualization`` in the config)."""
    cfg.load_from = args.checkpoint
    if args.show or args.show_dir:
        from mmdet.engine.hooks.utils import trigger_visualization_hook
        cfg = trigger_visualization_hook(cfg, args)
    if args.tta:
        if 'tta_model' not in cfg or 'tta_pipeline' not in cfg:
            raise RuntimeError('--tta needs `tta_model` and `tta_pipeline` in the config')
        cfg.test_dataloader.dataset.pipeline = cfg.tta_pipeline
        cfg.tta_model.module = cfg.model
        cfg.model = cfg.tta_model
    if args.out is not None:
        if not args.out.endswith(('.pkl', '.pickle')):
            raise ValueError('--out must be a .pkl or .pickle file')
        cfg.test_evaluator = list(cfg.test_evaluator) if isinstance(cfg.test_evaluator, list) \
            else [cfg.test_evaluator]
        cfg.test_evaluator.append(dict(type='DumpDetResults', out_file_path=args.out))
    return cfg


def main(argv=None):
    args = parse_args(argv)
    cfg = apply_test_args(load_config(args), args)
    runner = build_runner(cfg)
    metrics = runner.test()
    from mmengine.dist import is_main_process
    main_process = is_main_process()
    shutdown(runner)
    if main_process:  # one summary line, also under dist_test.sh
        print({k: round(float(v), 4) for k, v in metrics.items()}, flush=True)
    return metrics


if __name__ == '__main__':
    main()
