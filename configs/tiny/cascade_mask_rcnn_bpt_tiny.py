# Tiny BPT Cascade Mask R-CNN on the generated COCO-format data
# (data/tiny/coco): the tiny frozen ViT with shallow BPT-bilinear prompts of
# ./_base_/tiny_vit.py, a simple feature pyramid and three cascade stages with
# the full-size configs' LayerNorm 4-conv-1-fc box head, at 64 channels. It
# shows the pipeline works end to end on a CPU; it is not a benchmark.
_base_ = [
    'mmdet::_base_/models/cascade-mask-rcnn_r50_fpn.py',
    './_base_/coco_tiny.py',
    'mmdet::_base_/default_runtime.py',
    './_base_/tiny_vit.py',
]

channels = 64
num_classes = 3
head_norm_cfg = dict(type='LN2d', eps=1e-6)
model = dict(
    data_preprocessor=dict(pad_size_divisor=32),
    backbone=dict(_base_.tiny_backbone, _delete_=True),
    neck=dict(
        _delete_=True,
        type='SimpleFeaturePyramid',
        in_channels=_base_.embed_dims,
        out_channels=channels,
        num_outs=5),
    rpn_head=dict(in_channels=channels, feat_channels=channels),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=channels),
        # Lists are replaced, not merged: rebuild the three stages from
        # mmdet's, keeping their box coders and losses.
        bbox_head=[
            dict(stage, type='Shared4Conv1FCBBoxHead', in_channels=channels,
                 conv_out_channels=channels, fc_out_channels=128,
                 norm_cfg=head_norm_cfg, num_classes=num_classes)
            for stage in _base_.model.roi_head.bbox_head
        ],
        mask_roi_extractor=dict(out_channels=channels),
        mask_head=dict(in_channels=channels, conv_out_channels=channels,
                       num_classes=num_classes)),
    # Fewer proposals and RoIs than mmdet's (three stages cost three times
    # the RoI work of Mask R-CNN on a CPU); images hold at most 3 objects.
    train_cfg=dict(
        rpn=dict(sampler=dict(num=64)),
        rpn_proposal=dict(max_per_img=300),
        rcnn=[
            dict(stage, sampler=dict(stage.sampler, num=32))
            for stage in _base_.model.train_cfg.rcnn
        ]),
    # After 30 iterations the averaged cascade scores are still below
    # mmdet's 0.05, which would leave the evaluation without detections.
    test_cfg=dict(
        rpn=dict(max_per_img=100),
        rcnn=dict(score_thr=0.0, max_per_img=20)))

max_iters = 30
train_cfg = dict(max_iters=max_iters, val_interval=max_iters)
default_hooks = dict(
    logger=dict(type='LoggerHook', interval=10),
    checkpoint=dict(type='CheckpointHook', by_epoch=False,
                    interval=max_iters))
log_processor = dict(by_epoch=False)
