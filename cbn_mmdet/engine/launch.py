"""Shared pieces of tools/train.py and tools/test.py (same options as mmdet's tools)."""
import argparse
import os
import os.path as osp

from mmengine.config import Config, DictAction


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--work-dir', help='directory for logs, configs and checkpoints')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config entries, key=value (e.g. train_dataloader.batch_size=2)')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'], default='none',
                        help='job launcher')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)


def load_config(args) -> Config:
    """Read the config, apply --cfg-options, --launcher and the work dir (CLI > file > name)."""
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    import cbn_mmdet  # noqa: F401  registers CBN and its hooks
    cfg = Config.fromfile(args.config)
    cfg.launcher = args.launcher
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(args.config))[0])
    return cfg


def _init_cpu_distributed(cfg) -> None:
    """A distributed launch (torchrun or Slurm) on a machine without CUDA: mmengine would call
    torch.cuda.set_device, use nccl and give DDP a GPU id. Start the process group with gloo
    ourselves (mmengine then uses it as is) and wrap the model in DDP without device ids."""
    import os
    import subprocess

    import torch
    import torch.distributed as dist
    if cfg.launcher not in ('pytorch', 'slurm') or torch.cuda.is_available() \
            or dist.is_initialized():
        return
    if cfg.launcher == 'slurm':  # what mmengine's slurm init derives, minus the GPU
        os.environ.setdefault('MASTER_ADDR', subprocess.getoutput(
            f"scontrol show hostname {os.environ['SLURM_NODELIST']} | head -n1"))
        os.environ.setdefault('MASTER_PORT', '29500')
        os.environ['WORLD_SIZE'] = os.environ['SLURM_NTASKS']
        os.environ['RANK'] = os.environ['SLURM_PROCID']
        os.environ['LOCAL_RANK'] = os.environ.get('SLURM_LOCALID', '0')
    backend = cfg.get('env_cfg', {}).get('dist_cfg', {}).get('backend', 'nccl')
    if backend != 'gloo':
        print(f'[cbn_mmdet] no CUDA device: using the gloo backend instead of {backend!r}',
              flush=True)
        cfg.env_cfg.dist_cfg.backend = 'gloo'
    dist.init_process_group('gloo')
    if cfg.get('model_wrapper_cfg') is None:
        cfg.model_wrapper_cfg = dict(
            type='MMDistributedDataParallel', device_ids=None, broadcast_buffers=False,
            find_unused_parameters=cfg.get('find_unused_parameters', False))


def quiet_broadcast_buffers_deprecation() -> None:
    """torch >= 2.13 deprecates DDP's ``broadcast_buffers`` with a FutureWarning in every
    process. mmengine (and our CPU wrapping) pass ``broadcast_buffers=False`` so that every
    process keeps its own BN/CBN statistics and windows, never synced; the replacement
    (``forward_sync_buffers=False``) still syncs buffers at wrapping, and torch's message itself
    says to keep ``broadcast_buffers=False`` for rank-local buffers. Only that message is hidden."""
    import warnings
    warnings.filterwarnings('ignore', message='`broadcast_buffers` is deprecated',
                            category=FutureWarning)


def build_runner(cfg):
    """The runner of our tools: mmengine's, with our checkpoint loader installed (mmengine's
    checkpoint types allowed under torch's safe loading, see :mod:`cbn_mmdet.engine.checkpoint`)."""
    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner

    from .checkpoint import install_checkpoint_loader
    install_checkpoint_loader(any_checkpoint=True)
    if cfg.launcher != 'none':
        quiet_broadcast_buffers_deprecation()
    _init_cpu_distributed(cfg)
    return Runner.from_cfg(cfg) if 'runner_type' not in cfg else RUNNERS.build(cfg)


def shutdown(runner=None) -> None:
    """End a distributed run explicitly: a barrier, then the DDP wrapper (its reducer holds
    the process group and the last gradient all-reduce) is dropped while the group is still
    alive, then the group is destroyed. Left to interpreter exit, the wrapper's destructor
    releases the gloo group last and joins gloo's worker threads while holding the GIL, which
    deadlocked a rank on torch 2.1.2 (a worker thread freeing finished work waits for the GIL)
    or aborted it ("terminate called without an active exception")."""
    import gc

    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.barrier()
    if runner is not None:
        from mmengine.model import is_model_wrapper
        if is_model_wrapper(runner.model):
            runner.model = runner.model.module
        gc.collect()
    dist.destroy_process_group()
