# As mask-rcnn_r50_fpn_cbn_4xb1-1x_coco.py, evaluated (and checkpointed at the end) with
# precise population statistics: PreciseStatsHook recomputes every trained BN-family layer's
# running statistics over 1,000 training images per GPU with the weights of that moment, before
# each validation and after the last epoch (at 1 image(s) per GPU the running statistics,
# an EMA of noisy per-iteration statistics, can be far from them; docs/studies.md section 6).
_base_ = './mask-rcnn_r50_fpn_cbn_4xb1-1x_coco.py'

custom_hooks = [dict(type='CBNHook', burnin_epochs='first_lr_step'),
                dict(type='PreciseStatsHook', num_images=1000)]
