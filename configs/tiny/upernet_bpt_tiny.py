# Tiny BPT UperNet on the generated ADE20K-layout data (data/tiny/ade20k): the
# tiny frozen ViT with shallow BPT-bilinear prompts of ./_base_/tiny_vit.py
# (features of all 4 blocks), mmseg's Feature2Pyramid neck, UPerHead and
# auxiliary FCN head at 64 channels, BN instead of SyncBN (one process). It
# shows the pipeline works end to end on a CPU; it is not a benchmark.
_base_ = [
    'mmseg::_base_/models/upernet_mae.py',
    './_base_/ade20k_tiny.py',
    'mmseg::_base_/default_runtime.py',
    './_base_/tiny_vit.py',
]

channels = 64
norm_cfg = dict(type='BN', requires_grad=True)
model = dict(
    data_preprocessor=dict(size=_base_.crop_size),
    pretrained=None,
    backbone=dict(
        _base_.tiny_backbone, _delete_=True, img_size=64,
        out_indices=(0, 1, 2, 3)),
    neck=dict(
        embed_dim=_base_.embed_dims, rescales=[4, 2, 1, 0.5],
        norm_cfg=norm_cfg),
    decode_head=dict(
        in_channels=[_base_.embed_dims] * 4, channels=channels,
        num_classes=150, norm_cfg=norm_cfg),
    auxiliary_head=dict(
        in_channels=_base_.embed_dims, channels=channels // 2,
        num_classes=150, norm_cfg=norm_cfg))

max_iters = 60
train_cfg = dict(max_iters=max_iters, val_interval=max_iters)
default_hooks = dict(
    logger=dict(type='LoggerHook', interval=10),
    checkpoint=dict(type='CheckpointHook', by_epoch=False,
                    interval=max_iters),
    # what tools/test.py --show-dir switches on, as in mmseg's schedules
    visualization=dict(type='SegVisualizationHook'))
