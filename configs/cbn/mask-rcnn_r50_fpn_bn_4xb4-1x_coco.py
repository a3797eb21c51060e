# Not a row of the paper's table: the small-batch study's reference point. BN in train mode
# (statistics of each GPU's own images) in the FPN, the 4conv1fc box head and the mask head;
# backbone BN frozen as in the paper setting.
_base_ = './mask-rcnn_r50_fpn_4conv1fc_4xb4-1x_coco.py'

norm_cfg = dict(type='BN', requires_grad=True)
model = dict(
    neck=dict(norm_cfg=norm_cfg),
    roi_head=dict(
        bbox_head=dict(norm_cfg=norm_cfg),
        mask_head=dict(norm_cfg=norm_cfg),))
