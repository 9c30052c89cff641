# Cascade Mask R-CNN on a frozen MAE ViT-B/16 (PromptedViT) with a
# ViTDet-style simple feature pyramid (both from ./vit_b_sfp.py, which says
# where the choices come from). No prompt here: the top-level configs add one.
# The authors' Cascade RoI heads have a box head with 4 convolutions and 1
# fully connected layer; from ViTDet: a 2-conv RPN head and LayerNorm in the
# RoI heads.
_base_ = ['mmdet::_base_/models/cascade-mask-rcnn_r50_fpn.py',
          './vit_b_sfp.py']

model = dict(
    backbone=dict(_base_.vit_b_backbone, _delete_=True),
    neck=dict(_base_.sfp_neck, _delete_=True),
    rpn_head=dict(num_convs=2),
    roi_head=dict(
        # The three stages keep mmdet's box coders and losses; only the head
        # type changes (lists are replaced, not merged, hence the rebuild).
        bbox_head=[
            dict(stage, type='Shared4Conv1FCBBoxHead', conv_out_channels=256,
                 norm_cfg=_base_.head_norm_cfg)
            for stage in _base_.model.roi_head.bbox_head
        ],
        mask_head=dict(norm_cfg=_base_.head_norm_cfg)))
