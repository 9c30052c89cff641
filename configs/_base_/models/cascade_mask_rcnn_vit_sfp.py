# Cascade Mask R-CNN on a frozen MAE ViT-B/16 (PromptedViT) with a
# ViTDet-style simple feature pyramid. No prompt here: the top-level configs
# add one.
#
# Where the choices come from:
# - the paper / the authors' detector: simple feature pyramid (256 channels,
#   scales 4, 2, 1, 1/2, an extra top level, LayerNorm); Cascade RoI heads
#   whose box head has 4 convolutions and 1 fully connected layer.
# - ViTDet, for what the paper does not publish: 1024-pixel input, windowed
#   attention (14x14, global in blocks 2, 5, 8, 11), the plain output of the
#   last block, a 2-conv RPN head, LayerNorm in the RoI heads.
# Backbone and neck are the same as in ./mask_rcnn_vit_sfp.py; they are
# repeated because two model bases cannot be merged.
_base_ = 'mmdet::_base_/models/cascade-mask-rcnn_r50_fpn.py'

custom_imports = dict(imports=['bpt_mm'], allow_failed_imports=False)

# 'LN2d' is bpt_mm's LayerNorm2d (mmdet 3.3.0 has no such norm); eps as
# ViTDet.
head_norm_cfg = dict(type='LN2d', eps=1e-6)

model = dict(
    backbone=dict(
        _delete_=True,
        type='PromptedViT',
        arch='base',
        img_size=1024,
        patch_size=16,
        out_indices=(11, ),
        final_norm=False,
        window_size=14,
        global_attn_indexes=(2, 5, 8, 11),
        frozen=True,
        # MAE's ViT-B/16 weights; put the file here or set
        # --cfg-options model.backbone.init_cfg.checkpoint=PATH
        init_cfg=dict(
            type='Pretrained',
            checkpoint='checkpoints/mae_pretrain_vit_base.pth')),
    neck=dict(
        _delete_=True,
        type='SimpleFeaturePyramid',
        in_channels=768,
        out_channels=256,
        scale_factors=(4.0, 2.0, 1.0, 0.5),
        num_outs=5,
        norm='LN'),
    rpn_head=dict(num_convs=2),
    roi_head=dict(
        # The three stages keep mmdet's box coders and losses; only the head
        # type changes (lists are replaced, not merged, hence the rebuild).
        bbox_head=[
            dict(stage, type='Shared4Conv1FCBBoxHead', conv_out_channels=256,
                 norm_cfg=head_norm_cfg)
            for stage in _base_.model.roi_head.bbox_head
        ],
        mask_head=dict(norm_cfg=head_norm_cfg)))
