# Study 3 (docs/studies.md): detection at 2 images per iteration on the digits data, CBN in the
# FPN, the 4conv1fc box head and the mask head. Backbone: the quick-start ResNet-18 at half width
# with GroupNorm (the same in every arm, trained from scratch); 600 training images, 3 epochs,
# lr 0.01 (linear scaling of the quick start's 0.04 at 8 images), burn-in 0.5 epoch.
# The BN and GN arms differ only in norm_cfg of neck and heads.
_base_ = '../quickstart/mask-rcnn_r18-w32_fpn_cbn_1xb8-8e_digits.py'

norm_cfg = dict(type='CBN', window=4, requires_grad=True)
model = dict(
    backbone=dict(norm_cfg=dict(type='GN', num_groups=8, requires_grad=True)),
    neck=dict(norm_cfg=norm_cfg),
    roi_head=dict(bbox_head=dict(norm_cfg=norm_cfg), mask_head=dict(norm_cfg=norm_cfg)))
train_dataloader = dict(batch_size=2, dataset=dict(indices=600))
optim_wrapper = dict(optimizer=dict(lr=0.01))
auto_scale_lr = dict(base_batch_size=2)  # the total batch of this lr
max_epochs = 3
train_cfg = dict(max_epochs=max_epochs, val_interval=max_epochs)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=200),
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True, milestones=[2], gamma=0.1),
]
custom_hooks = [dict(type='CBNHook', burnin_epochs=0.5)]
default_hooks = dict(checkpoint=dict(interval=max_epochs))
