# Small-batch regime (not a row of the paper's COCO table): as
# faster-rcnn_r50_fpn_cbn_4xb4-1x_coco.py with 2 images per GPU on 4 GPUs; learning rate scaled
# linearly (16 images at 0.02 -> 8 images at 0.01).
_base_ = './faster-rcnn_r50_fpn_cbn_4xb4-1x_coco.py'

train_dataloader = dict(batch_size=2)
auto_scale_lr = dict(base_batch_size=8)  # the total batch of this lr
optim_wrapper = dict(optimizer=dict(lr=0.01))
# CBN pools about 16 images, as window 4 does at 4 images per GPU: window 8 at 2 images
# per GPU (window 4 would pool only 8).
model = dict(
    neck=dict(norm_cfg=dict(window=8)),
    roi_head=dict(bbox_head=dict(norm_cfg=dict(window=8))))
