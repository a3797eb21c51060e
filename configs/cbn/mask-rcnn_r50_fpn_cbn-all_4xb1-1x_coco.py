# Small-batch regime (not a row of the paper's COCO table): as
# mask-rcnn_r50_fpn_cbn-all_4xb4-1x_coco.py with 1 image per GPU on 4 GPUs; learning rate scaled
# linearly (16 images at 0.02 -> 4 images at 0.005).
_base_ = './mask-rcnn_r50_fpn_cbn-all_4xb4-1x_coco.py'

train_dataloader = dict(batch_size=1)
auto_scale_lr = dict(base_batch_size=4)  # the total batch of this lr
optim_wrapper = dict(optimizer=dict(lr=0.005))
# CBN pools about 16 images, as window 4 does at 4 images per GPU: window 16 at 1 image
# per GPU (window 4 would pool only 4).
# The backbone's CBN layers leave plain BN after 0.05 epochs (on COCO train2017: 733 iterations
# at 4x2, 1466 at 4x1; the warmup is 500), not after 8 epochs: 8 epochs of plain BN on
# 1 image would overwrite the ImageNet statistics of stages 2-4 for two thirds of the schedule.
custom_hooks = [dict(type='CBNHook', burnin_epochs='first_lr_step', burnin_epochs_by_module=dict(backbone=0.05))]
model = dict(
    neck=dict(norm_cfg=dict(window=16)),
    roi_head=dict(bbox_head=dict(norm_cfg=dict(window=16)), mask_head=dict(norm_cfg=dict(window=16))),
    backbone=dict(norm_cfg=dict(window=16)))
