"""Write a checkpoint whose BN-family running statistics are precise population statistics:
``python tools/precise_stats.py CONFIG CHECKPOINT [--out NEW.pth] [--num-images 1000]``.

For a model trained without ``PreciseStatsHook``: the weights of CHECKPOINT are fixed, N training
images (the config's train_dataloader) run through the model in train mode, and every trained
BatchNorm-family layer's running_mean / running_var is replaced by the population estimate
(``cbn_mmdet.engine.precise_stats``). Everything else in the checkpoint is kept. Then evaluate
as usual: ``python tools/test.py CONFIG NEW.pth``. Distributed: ``--launcher pytorch`` under
torchrun (each process runs N images; the sums are all-reduced).
"""
import argparse
import os.path as osp

from cbn_mmdet.engine.launch import add_common_args, build_runner, load_config, shutdown


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Precise BN statistics for a checkpoint')
    parser.add_argument('config', help='the config the checkpoint was trained with')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--out', help='new checkpoint (default: CHECKPOINT with _precise added)')
    parser.add_argument('--num-images', type=int, default=1000,
                        help='training images per process (default 1000)')
    add_common_args(parser)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.num_images < 1:
        raise SystemExit(f'tools/precise_stats.py: error: --num-images must be >= 1, got {args.num_images}')
    out = args.out or osp.splitext(args.checkpoint)[0] + '_precise.pth'
    cfg = load_config(args)
    cfg.load_from = None
    cfg.resume = False
    import torch
    from mmengine.dist import is_main_process
    from mmengine.model import is_model_wrapper

    from cbn_mmdet.engine.checkpoint import load_local_checkpoint
    from cbn_mmdet.engine.precise_stats import precise_stats_for_runner, trained_bn_layers
    runner = build_runner(cfg)
    runner.load_checkpoint(args.checkpoint, map_location='cpu')
    precise_stats_for_runner(runner, args.num_images)
    model = runner.model.module if is_model_wrapper(runner.model) else runner.model
    if is_main_process():
        ckpt = load_local_checkpoint(args.checkpoint, map_location='cpu')
        state = ckpt['state_dict']
        names = []
        for name, layer in trained_bn_layers(model):
            for key in ('running_mean', 'running_var'):
                state[f'{name}.{key}'] = getattr(layer, key).detach().cpu().clone()
            names.append(name)
        ckpt.setdefault('meta', {})['precise_stats'] = dict(num_images=args.num_images,
                                                            layers=len(names))
        torch.save(ckpt, out)
        print(f'[cbn_mmdet] precise statistics of {len(names)} layers written to {out}', flush=True)
    shutdown(runner)
    return out


if __name__ == '__main__':
    main()
