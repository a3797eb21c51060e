# Paper row: Faster R-CNN, GN: box AP 37.7 (Yao et al. 2020, COCO val, R50-FPN 1x, 4 GPUs x 4
# images, backbone BN frozen). Norm under test in the FPN and the 4conv1fc box head:
# GroupNorm, 32 groups.
_base_ = './faster-rcnn_r50_fpn_4conv1fc_4xb4-1x_coco.py'

norm_cfg = dict(type='GN', num_groups=32, requires_grad=True)
model = dict(
    neck=dict(norm_cfg=norm_cfg),
    roi_head=dict(
        bbox_head=dict(norm_cfg=norm_cfg)))
