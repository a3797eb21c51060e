# Paper row: Mask R-CNN, CBN: box AP 38.4, mask AP 34.7 (Yao et al. 2020, COCO val, R50-FPN 1x, 4 GPUs x 4
# images, backbone BN frozen). Norm under test in the FPN, the 4conv1fc box head and the mask head:
# CBN, window 4 (3 stored iterations + the current one), burn-in 8 epochs (until the first lr step).
_base_ = './mask-rcnn_r50_fpn_4conv1fc_4xb4-1x_coco.py'
custom_imports = dict(imports=['cbn_mmdet'], allow_failed_imports=False)
# Burn-in until the first lr step (epoch 8 of 12, as in the paper): CBNHook reads it from the
# schedule, so a longer schedule or --cfg-options that move the step move the burn-in with it.
custom_hooks = [dict(type='CBNHook', burnin_epochs='first_lr_step')]

norm_cfg = dict(type='CBN', window=4, requires_grad=True)
model = dict(
    neck=dict(norm_cfg=norm_cfg),
    roi_head=dict(
        bbox_head=dict(norm_cfg=norm_cfg),
        mask_head=dict(norm_cfg=norm_cfg),))
