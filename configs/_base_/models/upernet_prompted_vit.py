# UperNet on a frozen MAE ViT-B/16 (PromptedViT), following mmseg's MAE
# setting (configs/mae: features of blocks 3, 5, 7, 11, Feature2Pyramid neck
# with rescales 4, 2, 1, 1/2, 768-channel UPerHead, auxiliary FCN head).
# The paper reports no ADE20K result: this is bpt_mm's own extension. No
# prompt here: the top-level configs add one.
_base_ = 'mmseg::_base_/models/upernet_mae.py'

custom_imports = dict(imports=['bpt_mm'], allow_failed_imports=False)

model = dict(
    # PromptedViT takes its checkpoint through init_cfg.
    pretrained=None,
    backbone=dict(
        _delete_=True,
        type='PromptedViT',
        arch='base',
        # mmseg's MAE setting; the checkpoint's 14x14 position embedding is
        # resampled to 32x32 once, when it is loaded.
        img_size=512,
        patch_size=16,
        out_indices=(3, 5, 7, 11),
        final_norm=False,
        frozen=True,
        # MAE's ViT-B/16 weights; put the file here or set
        # --cfg-options model.backbone.init_cfg.checkpoint=PATH
        init_cfg=dict(
            type='Pretrained',
            checkpoint='checkpoints/mae_pretrain_vit_base.pth')),
    neck=dict(embed_dim=768, rescales=[4, 2, 1, 0.5]),
    decode_head=dict(
        in_channels=[768, 768, 768, 768], channels=768, num_classes=150),
    auxiliary_head=dict(in_channels=768, num_classes=150))
