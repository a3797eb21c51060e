# Study 5 (docs/studies.md), paper row SyncBN, 4 processes x 4 images:
# configs/cbn/mask-rcnn_r50_fpn_syncbn_4xb4-1x_coco.py on the digits miniature (see configs/_base_/paper_table_miniature.py).
# torch's SyncBatchNorm refuses CPU tensors; SyncCBN with window 1 computes the same
# statistics (mean and variance over the images of all processes, gradients through them).
_base_ = ['../../cbn/mask-rcnn_r50_fpn_syncbn_4xb4-1x_coco.py', '../../_base_/paper_table_miniature.py']

train_dataloader = _base_.miniature.train_dataloader
val_dataloader = test_dataloader = _base_.miniature.val_dataloader
val_evaluator = test_evaluator = _base_.miniature.val_evaluator
train_cfg = _base_.miniature.train_cfg
param_scheduler = _base_.miniature.param_scheduler
default_hooks = _base_.miniature.default_hooks

_sync = dict(_delete_=True, type='SyncCBN', window=1, requires_grad=True)
model = _base_.miniature.model
model.neck.norm_cfg = _sync
model.roi_head.bbox_head.norm_cfg = _sync
model.roi_head.mask_head.norm_cfg = _sync
