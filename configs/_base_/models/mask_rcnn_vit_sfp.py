# Mask R-CNN on a frozen MAE ViT-B/16 (PromptedViT) with a ViTDet-style simple
# feature pyramid (both from ./vit_b_sfp.py, which says where the choices come
# from). No prompt here: the top-level configs add one. From ViTDet: a 2-conv
# RPN head and LayerNorm in the RoI heads (4-conv-1-fc box head, 4-conv mask
# head).
_base_ = ['mmdet::_base_/models/mask-rcnn_r50_fpn.py', './vit_b_sfp.py']

model = dict(
    backbone=dict(_base_.vit_b_backbone, _delete_=True),
    neck=dict(_base_.sfp_neck, _delete_=True),
    rpn_head=dict(num_convs=2),
    roi_head=dict(
        bbox_head=dict(
            type='Shared4Conv1FCBBoxHead',
            conv_out_channels=256,
            norm_cfg=_base_.head_norm_cfg),
        mask_head=dict(norm_cfg=_base_.head_norm_cfg)))
