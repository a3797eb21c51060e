# Study 3 (docs/studies.md): as mask-rcnn_r18-w32-gn_fpn_cbn_1xb2-3e_digits.py with
# BN in train mode (each batch's own statistics) in the FPN, the 4conv1fc box head and the mask head instead of CBN.
_base_ = './mask-rcnn_r18-w32-gn_fpn_cbn_1xb2-3e_digits.py'

norm_cfg = dict(type='BN', requires_grad=True)
# _delete_: replace the CBN settings of the base instead of merging into them
model = dict(
    neck=dict(norm_cfg=dict(_delete_=True, **norm_cfg)),
    roi_head=dict(bbox_head=dict(norm_cfg=dict(_delete_=True, **norm_cfg)),
                  mask_head=dict(norm_cfg=dict(_delete_=True, **norm_cfg))))
custom_hooks = []
