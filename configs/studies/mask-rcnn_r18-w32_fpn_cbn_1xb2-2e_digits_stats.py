# Study 1 (docs/studies.md): statistics quality during real training at 2 images per iteration.
# The quick-start detector with CBN in FPN and heads, trained 2 epochs at batch 2 (lr scaled
# linearly from 8 images at 0.04), burn-in 0.2 epoch; CBNStatsProbeHook compares every 25
# iterations the statistics BN (one batch), plain averaging and CBN normalize with against the
# window's batches re-run as one large batch with the current weights.
_base_ = '../quickstart/mask-rcnn_r18-w32_fpn_cbn_1xb8-8e_digits.py'

train_dataloader = dict(batch_size=2)
optim_wrapper = dict(optimizer=dict(lr=0.01))
auto_scale_lr = dict(base_batch_size=2)  # the total batch of this lr
max_epochs = 2
train_cfg = dict(max_epochs=max_epochs, val_interval=max_epochs)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=200),
]
custom_hooks = [
    dict(type='CBNHook', burnin_epochs=0.2),
    dict(type='CBNStatsProbeHook', interval=25),
]
default_hooks = dict(checkpoint=dict(interval=2))
