# Tiny BPT Mask R-CNN on the generated COCO-format data (data/tiny/coco, made
# by `python tools/make_tiny_data.py` or `make demo`): the tiny frozen ViT with
# shallow BPT-bilinear prompts of ./_base_/tiny_vit.py, a simple feature
# pyramid and Mask R-CNN heads, all small enough to train on a CPU in about a
# minute. It shows the pipeline works end to end; it is not a benchmark.
_base_ = [
    'mmdet::_base_/models/mask-rcnn_r50_fpn.py',
    './_base_/coco_tiny.py',
    'mmdet::_base_/default_runtime.py',
    './_base_/tiny_vit.py',
]

channels = 64
num_classes = 3
model = dict(
    data_preprocessor=dict(pad_size_divisor=32),
    backbone=dict(_base_.tiny_backbone, _delete_=True),
    neck=dict(
        _delete_=True,
        type='SimpleFeaturePyramid',
        in_channels=_base_.embed_dims,
        out_channels=channels,
        num_outs=5),
    # Anchors of 16-256 px (scale 4 at strides 4-64) rather than mmdet's
    # 32-512: the generated objects are 12-60 px, and an object under ~18 px
    # overlaps no 32-px anchor by the RPN's min_pos_iou (0.3), so it never
    # got a positive anchor.
    rpn_head=dict(in_channels=channels, feat_channels=channels,
                  anchor_generator=dict(scales=[4])),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=channels),
        bbox_head=dict(in_channels=channels, fc_out_channels=128,
                       num_classes=num_classes),
        mask_roi_extractor=dict(out_channels=channels),
        mask_head=dict(in_channels=channels, conv_out_channels=channels,
                       num_classes=num_classes)),
    train_cfg=dict(
        rpn=dict(sampler=dict(num=64)),
        rcnn=dict(sampler=dict(num=64))),
    test_cfg=dict(rcnn=dict(max_per_img=20)))

max_iters = 60
train_cfg = dict(max_iters=max_iters, val_interval=max_iters)
default_hooks = dict(
    logger=dict(type='LoggerHook', interval=10),
    checkpoint=dict(type='CheckpointHook', by_epoch=False,
                    interval=max_iters))
log_processor = dict(by_epoch=False)
