# Not a row of the paper's table: "CBN everywhere". The backbone's norms are CBN as well and
# train their statistics (norm_eval=False; ImageNet BN checkpoints load into CBN unchanged, and
# the stem and stage 1 stay frozen as in mmdet's default). Neck and heads as in
# mask-rcnn_r50_fpn_cbn_4xb4-1x_coco.py.
_base_ = './mask-rcnn_r50_fpn_cbn_4xb4-1x_coco.py'

norm_cfg = dict(type='CBN', window=4, requires_grad=True)
model = dict(backbone=dict(norm_cfg=norm_cfg, norm_eval=False))
