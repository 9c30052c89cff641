# The frozen MAE ViT-B/16 backbone and the simple feature pyramid shared by
# ./mask_rcnn_vit_sfp.py and ./cascade_mask_rcnn_vit_sfp.py. They are plain
# variables, not `model`, because a config's bases may not share keys and
# each detector base already inherits mmdet's `model`.
#
# Where the choices come from:
# - the paper / the authors' detector: simple feature pyramid with 256
#   channels, scales 4, 2, 1, 1/2 plus an extra top level (num_outs=5), with
#   LayerNorm; a frozen MAE ViT-B.
# - ViTDet (Li et al. 2022; mmdet's projects/ViTDet), for what the paper does
#   not publish: 1024-pixel input (img_size), windowed attention (14x14
#   windows, global attention in blocks 2, 5, 8, 11), the plain output of the
#   last block (no final norm), and LayerNorm in the RoI heads.
custom_imports = dict(imports=['bpt_mm'], allow_failed_imports=False)

# LayerNorm over channels for the convolutions of the RoI heads. 'LN2d' is
# bpt_mm's LayerNorm2d (mmdet 3.3.0 has no such norm). No eps, as mmdet's
# ViTDet config: mmcv's build_norm_layer then sets 1e-5, the eps ViTDet's
# heads (and its pyramid, see SimpleFeaturePyramid's norm_eps) run with.
head_norm_cfg = dict(type='LN2d')

vit_b_backbone = dict(
    type='PromptedViT',
    arch='base',
    # The checkpoint's 14x14 position embedding is resampled to 64x64 once,
    # when it is loaded.
    img_size=1024,
    patch_size=16,
    out_indices=(11, ),
    final_norm=False,
    window_size=14,
    global_attn_indexes=(2, 5, 8, 11),
    frozen=True,
    # MAE's ViT-B/16 weights (mae_pretrain_vit_base.pth from the MAE
    # repository; timm/mmpretrain layouts are detected and converted). Put
    # the file here, or set the path with
    # --cfg-options model.backbone.init_cfg.checkpoint=PATH
    init_cfg=dict(
        type='Pretrained',
        checkpoint='checkpoints/mae_pretrain_vit_base.pth'))

sfp_neck = dict(
    type='SimpleFeaturePyramid',
    in_channels=768,
    out_channels=256,
    scale_factors=(4.0, 2.0, 1.0, 0.5),
    num_outs=5,
    norm='LN')
