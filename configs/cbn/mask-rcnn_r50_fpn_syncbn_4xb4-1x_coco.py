# Paper row: Mask R-CNN, SyncBN: box AP 38.5, mask AP 34.3 (Yao et al. 2020, COCO val, R50-FPN 1x, 4 GPUs x 4
# images, backbone BN frozen). Norm under test in the FPN, the 4conv1fc box head and the mask head:
# SyncBN (statistics over all GPUs of the iteration).
_base_ = './mask-rcnn_r50_fpn_4conv1fc_4xb4-1x_coco.py'

norm_cfg = dict(type='SyncBN', requires_grad=True)
model = dict(
    neck=dict(norm_cfg=norm_cfg),
    roi_head=dict(
        bbox_head=dict(norm_cfg=norm_cfg),
        mask_head=dict(norm_cfg=norm_cfg),))
# SyncBN needs the distributed launch (tools/dist_train.sh), like mmdet's SyncBN configs.
