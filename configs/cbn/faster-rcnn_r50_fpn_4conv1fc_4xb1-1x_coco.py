# Small-batch regime of the paper's "-" row (no normalization in FPN and heads, backbone BN
# frozen): as faster-rcnn_r50_fpn_4conv1fc_4xb4-1x_coco.py with 1 image per GPU on 4 GPUs;
# learning rate scaled linearly (16 images at 0.02 -> 4 images at 0.005).
_base_ = './faster-rcnn_r50_fpn_4conv1fc_4xb4-1x_coco.py'

train_dataloader = dict(batch_size=1)
auto_scale_lr = dict(base_batch_size=4)  # the total batch of this lr
optim_wrapper = dict(optimizer=dict(lr=0.005))
