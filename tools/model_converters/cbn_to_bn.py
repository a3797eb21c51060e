"""Convert a trained CBN detector into a stock MMDetection BN detector (config + checkpoint).

    python tools/model_converters/cbn_to_bn.py CONFIG CHECKPOINT OUT_DIR [--sync-cbn-as BN|SyncBN]

writes ``OUT_DIR/<config file name>`` and ``OUT_DIR/<checkpoint file name>``, which MMDetection
without cbn_mmdet installed builds, loads strictly and evaluates with the CBN model's eval
outputs (eval-mode CBN is BatchNorm2d with the same running statistics).

The config (the fully merged one, dumped by mmengine: no ``_base_`` left):
  - every norm_cfg of type CBN / CrossIterationBatchNorm2d / SyncCBN /
    SyncCrossIterationBatchNorm2d, wherever it is in the tree, becomes ``BN`` with its eps,
    momentum, affine, track_running_stats and requires_grad; the CBN-only options (window,
    burnin, compensate; SyncCBN's process_group) go. SyncCBN becomes ``BN`` too, not SyncBN:
    the converted model is for evaluation and deployment, where the two compute the same thing
    from the running statistics, SyncBN needs a process group (and a GPU) to train, and
    MMDetection's DetInferencer reverts SyncBN to BN anyway; ``--sync-cbn-as SyncBN`` keeps it
    synchronized for multi-GPU fine-tuning (the checkpoint is the same either way).
  - hooks of ours (CBNHook, PreciseStatsHook, SeedPerIterationHook, CBNStatsProbeHook: any
    entry whose type cbn_mmdet registers) are dropped; they act in training only.
    ``custom_imports`` loses cbn_mmdet (and goes if nothing else is imported).
  - the digits dataset needs nothing: our digits configs already use mmdet's ``CocoDataset``
    with ``metainfo=dict(classes=('0', ..., '9'))`` over COCO-format json (cbn_mmdet only
    generates the files; it registers no dataset class), so its entries stay as they are. Any
    other type registered by cbn_mmdet is an error naming where it is.

The checkpoint keeps ``state_dict`` (weights, running statistics, ``num_batches_tracked``),
``meta`` (its ``cfg`` replaced by the converted config's text, which DetInferencer(weights=...)
builds the model from; ``converted_from`` added) and ``ema_state_dict`` if EMAHook saved one,
each without the CBN layers' ``cbn_*`` keys (counters, and windows of old layouts). It drops
``cbn_window``, ``optimizer``, ``param_schedulers``, ``message_hub`` and any other entry: it is
for evaluation, deployment or ``load_from``, not for ``--resume`` of the CBN run.

Before writing anything it checks that the checkpoint holds CBN state and loads into the
config's model with no missing or unexpected key, and it exits with an error naming the file
and what is wrong otherwise. Conversion logic: ``cbn_mmdet/deploy/``.
"""
import argparse
import sys

from cbn_mmdet.deploy import SYNC_CBN_AS, ConversionError, cbn_to_bn


def parse_args(argv=None):
    p = argparse.ArgumentParser(description='Convert a CBN model (config + checkpoint) into a '
                                'stock MMDetection BN model')
    p.add_argument('config', help='the CBN model\'s config file')
    p.add_argument('checkpoint', help='its checkpoint (.pth)')
    p.add_argument('out_dir', help='where the converted config and checkpoint are written '
                   '(same file names)')
    p.add_argument('--sync-cbn-as', choices=['BN', 'SyncBN'], default=SYNC_CBN_AS,
                   help='what SyncCBN becomes (default: BN, for evaluation and deployment)')
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        res = cbn_to_bn(args.config, args.checkpoint, args.out_dir, sync_cbn_as=args.sync_cbn_as)
    except ConversionError as e:
        print(f'cbn_to_bn: error: {e}', file=sys.stderr, flush=True)
        raise SystemExit(1)
    removed = res.removed_keys
    print(f'{len(res.cbn_layers)} CBN layers -> BN', flush=True)
    for line in res.config_changes:
        print(f'  config  {line}')
    print(f"  checkpoint: removed {len(removed['state_dict'])} cbn_* keys from state_dict"
          + (f", {len(removed['ema_state_dict'])} from ema_state_dict" if removed['ema_state_dict'] else '')
          + (f"; dropped {', '.join(res.dropped)}" if res.dropped else ''))
    print(f'wrote {res.config}')
    print(f'wrote {res.checkpoint}', flush=True)
    return res


if __name__ == '__main__':
    main()
