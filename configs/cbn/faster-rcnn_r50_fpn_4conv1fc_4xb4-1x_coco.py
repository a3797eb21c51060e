# Paper row: Faster R-CNN, "-" (frozen BN only): box AP 36.8 (Yao et al. 2020, COCO val,
# R50-FPN 1x, 4 GPUs x 4 images). The backbone's BN is frozen with ImageNet statistics
# (norm_eval=True, mmdet's default); FPN and the 4conv1fc box head have no normalization.
# Every other config in this folder differs from this one only in the norm under test.
_base_ = 'mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py'

model = dict(
    roi_head=dict(
        bbox_head=dict(
            type='Shared4Conv1FCBBoxHead',
            conv_out_channels=256)))

# 4 GPUs x 4 images = 16 images per iteration at lr 0.02 (mmdet's 1x schedule: steps at 8, 11).
# auto_scale_lr's base_batch_size is always the total batch the lr is set for.
train_dataloader = dict(batch_size=4, num_workers=4)
auto_scale_lr = dict(enable=False, base_batch_size=16)
# The optimization recipe of the authors' release (mmdet 0.6 configs), not mmdet 3.3's: gradient
# clipping (L2 norm 35) and a linear warmup from 1/3 of the lr over 500 iterations.
optim_wrapper = dict(optimizer=dict(lr=0.02), clip_grad=dict(max_norm=35, norm_type=2))
param_scheduler = [
    dict(type='LinearLR', start_factor=1.0 / 3, by_epoch=False, begin=0, end=500),
    dict(type='MultiStepLR', begin=0, end=12, by_epoch=True, milestones=[8, 11], gamma=0.1),
]
