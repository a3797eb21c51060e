# Study 5 (docs/studies.md), paper row "-": no norm in FPN and heads (frozen backbone BN only), 4 processes x 2 images:
# configs/cbn/mask-rcnn_r50_fpn_4conv1fc_4xb2-1x_coco.py on the digits miniature (see configs/_base_/paper_table_miniature.py).
_base_ = ['../../cbn/mask-rcnn_r50_fpn_4conv1fc_4xb2-1x_coco.py', '../../_base_/paper_table_miniature.py']

model = _base_.miniature.model
train_dataloader = _base_.miniature.train_dataloader
val_dataloader = test_dataloader = _base_.miniature.val_dataloader
val_evaluator = test_evaluator = _base_.miniature.val_evaluator
train_cfg = _base_.miniature.train_cfg
param_scheduler = _base_.miniature.param_scheduler
default_hooks = _base_.miniature.default_hooks
