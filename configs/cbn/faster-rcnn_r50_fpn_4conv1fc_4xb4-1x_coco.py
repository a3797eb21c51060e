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
train_dataloader = dict(batch_size=4, num_workers=4)
optim_wrapper = dict(optimizer=dict(lr=0.02))
auto_scale_lr = dict(enable=False, base_batch_size=16)
