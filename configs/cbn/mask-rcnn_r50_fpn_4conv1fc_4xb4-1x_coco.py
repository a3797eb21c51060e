# Paper row: Mask R-CNN, "-" (frozen BN only): box AP 37.6, mask AP 34.0 (Yao et al. 2020, COCO
# val, R50-FPN 1x, 4 GPUs x 4 images). Backbone BN frozen with ImageNet statistics
# (norm_eval=True); FPN, the 4conv1fc box head and the mask head have no normalization.
# Every other Mask R-CNN config in this folder differs from this one only in the norm under test.
_base_ = 'mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py'

model = dict(
    roi_head=dict(
        bbox_head=dict(
            type='Shared4Conv1FCBBoxHead',
            conv_out_channels=256)))

# 4 GPUs x 4 images = 16 images per iteration at lr 0.02 (mmdet's 1x schedule: steps at 8, 11).
train_dataloader = dict(batch_size=4, num_workers=4)
optim_wrapper = dict(optimizer=dict(lr=0.02))
auto_scale_lr = dict(enable=False, base_batch_size=16)
