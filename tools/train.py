"""Train a detector: ``python tools/train.py CONFIG [--resume [CKPT]] [--amp] ...``.

Same options as MMDetection's tools/train.py; works with this repo's configs and with any
config that lists ``cbn_mmdet`` in ``custom_imports``.
"""
import argparse

from cbn_mmdet.engine.launch import add_common_args, build_runner, load_config, shutdown


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Train a detector (CBN-aware)')
    parser.add_argument('config', help='train config file')
    parser.add_argument('--amp', action='store_true', help='automatic mixed precision training')
    parser.add_argument('--auto-scale-lr', action='store_true',
                        help='scale the learning rate linearly with the total batch size')
    parser.add_argument('--resume', nargs='?', type=str, const='auto',
                        help='resume from CKPT, or from the latest checkpoint in the work dir '
                             'when no path is given')
    add_common_args(parser)
    return parser.parse_args(argv)


def apply_train_args(cfg, args):
    """--amp, --auto-scale-lr and --resume, exactly as MMDetection's tools/train.py applies them."""
    if args.amp:
        cfg.optim_wrapper.type = 'AmpOptimWrapper'
        cfg.optim_wrapper.loss_scale = 'dynamic'
    if args.auto_scale_lr:
        if 'base_batch_size' not in (cfg.get('auto_scale_lr') or {}):
            raise RuntimeError('--auto-scale-lr needs `auto_scale_lr = dict(base_batch_size=...)` '
                               'in the config')
        cfg.auto_scale_lr.enable = True
    if args.resume == 'auto':
        cfg.resume, cfg.load_from = True, None
    elif args.resume is not None:
        cfg.resume, cfg.load_from = True, args.resume
    return cfg


def check_amp_device(args) -> None:
    """--amp needs an accelerator (mmengine's AmpOptimWrapper refuses a CPU-only machine, but
    only after the model is built): exit with one line instead."""
    if not args.amp:
        return
    from mmengine.device import get_device
    if get_device() == 'cpu':
        raise SystemExit('tools/train.py: error: --amp needs a CUDA (or NPU/MLU/MUSA) device and '
                         'this machine has none; train without --amp (float32) on CPU.')


def main(argv=None):
    args = parse_args(argv)
    check_amp_device(args)
    cfg = apply_train_args(load_config(args), args)
    runner = build_runner(cfg)
    runner.train()
    shutdown(runner)


if __name__ == '__main__':
    main()
