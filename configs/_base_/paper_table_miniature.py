# Study 5 (docs/studies.md): the paper's COCO table in miniature. Every config in
# configs/studies/paper_table/ inherits one real config of configs/cbn/ (its norm, per-GPU batch,
# lr, window, clipping, CBN burn-in) and takes from `miniature` below only what the miniature
# changes:
# - data: the digits COCO dataset (tools/make_digits_coco.py): the first 200 training canvases,
#   the 200 val canvases, resized from 128 to 112 px (digits of 14-38 px); no flips (a mirrored
#   digit is not a digit);
# - backbone: the quick-start ResNet-18 at base width 32, pretrained on digit classification by
#   tools/pretrain_backbone.py (the stand-in for ImageNet weights); BN statistics frozen
#   (norm_eval) and stage 1 frozen, as in the real configs; the widths that follow from it (FPN
#   and heads at 64 channels, anchors of 16-256 px) and fewer proposals/RoIs for small images
#   with 2-5 objects;
# - schedule length: 12 epochs of 200 images with the 1x shape (lr steps at epochs 8 and 11);
#   the linear warmup (from 1/3) lasts 1 epoch instead of 500 iterations. CBN's burn-in stays the
#   real configs': until the first lr step.
# Sized so that the whole study (tools/studies/paper_table.py) fits in about 2 h on 2 cores.
_data_root = 'data/digits_coco/'
_train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='Resize', scale=(112, 112), keep_ratio=True),
    dict(type='PackDetInputs'),
]
_test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(112, 112), keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='PackDetInputs',
         meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]
_metainfo = dict(classes=('0', '1', '2', '3', '4', '5', '6', '7', '8', '9'))
_evaluator = dict(ann_file=_data_root + 'annotations/instances_val.json', metric=['bbox', 'segm'])
_width = 64
miniature = dict(
    model=dict(
        backbone=dict(
            depth=18,
            base_channels=32,
            init_cfg=dict(type='Pretrained', checkpoint='data/pretrained/resnet18-w32_digits.pth')),
        neck=dict(in_channels=[32, 64, 128, 256], out_channels=_width),
        rpn_head=dict(in_channels=_width, feat_channels=_width, anchor_generator=dict(scales=[4])),
        roi_head=dict(
            bbox_roi_extractor=dict(out_channels=_width),
            bbox_head=dict(in_channels=_width, conv_out_channels=_width, fc_out_channels=256,
                           num_classes=10),
            mask_roi_extractor=dict(out_channels=_width),
            mask_head=dict(in_channels=_width, conv_out_channels=_width, num_classes=10)),
        train_cfg=dict(rpn_proposal=dict(nms_pre=1000, max_per_img=300),
                       rcnn=dict(sampler=dict(num=64))),
        test_cfg=dict(rpn=dict(nms_pre=300, max_per_img=100), rcnn=dict(max_per_img=20))),
    # batch_size stays the real config's (images per process)
    train_dataloader=dict(
        num_workers=0,
        persistent_workers=False,
        dataset=dict(data_root=_data_root, metainfo=_metainfo, indices=200,
                     ann_file='annotations/instances_train.json', data_prefix=dict(img='train/'),
                     filter_cfg=dict(filter_empty_gt=True, min_size=4), pipeline=_train_pipeline)),
    val_dataloader=dict(
        batch_size=8,
        num_workers=0,
        persistent_workers=False,
        dataset=dict(data_root=_data_root, metainfo=_metainfo,
                     ann_file='annotations/instances_val.json', data_prefix=dict(img='val/'),
                     pipeline=_test_pipeline)),
    val_evaluator=_evaluator,
    train_cfg=dict(max_epochs=12, val_interval=12),
    param_scheduler=[
        dict(type='LinearLR', start_factor=1.0 / 3, by_epoch=True, begin=0, end=1,
             convert_to_iter_based=True),
        dict(type='MultiStepLR', begin=0, end=12, by_epoch=True, milestones=[8, 11], gamma=0.1),
    ],
    default_hooks=dict(logger=dict(interval=10), checkpoint=dict(interval=12)),
)
