# Small-batch regime (not a row of the paper's COCO table): as
# faster-rcnn_r50_fpn_cbn-all_4xb4-1x_coco.py with 2 images per GPU on 4 GPUs; learning rate scaled
# linearly (16 images at 0.02 -> 8 images at 0.01).
_base_ = './faster-rcnn_r50_fpn_cbn-all_4xb4-1x_coco.py'

train_dataloader = dict(batch_size=2)
auto_scale_lr = dict(base_batch_size=8)  # the total batch of this lr
optim_wrapper = dict(optimizer=dict(lr=0.01))
# CBN pools about 16 images, as window 4 does at 4 images per GPU: window 8 at 2 images
# per GPU (window 4 would pool only 8).
# The backbone's CBN layers leave plain BN after 0.05 epochs (on COCO train2017: 733 iterations
# at 4x2, 1466 at 4x1; the warmup is 500), not after 8 epochs: 8 epochs of plain BN on
# 2 images would overwrite the ImageNet statistics of stages 2-4 for two thirds of the schedule.
custom_hooks = [dict(type='CBNHook', burnin_epochs='first_lr_step', burnin_epochs_by_module=dict(backbone=0.05))]
model = dict(
    neck=dict(norm_cfg=dict(window=8)),
    roi_head=dict(bbox_head=dict(norm_cfg=dict(window=8))),
    backbone=dict(norm_cfg=dict(window=8)))
