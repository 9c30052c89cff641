# The generated tiny ADE20K-layout semantic set (data/tiny/ade20k: 8 train
# and 4 val images of 64x64 with regions of ADE classes 1, 3, 13 and 150),
# made by `python tools/make_tiny_data.py` or
# `bpt_mm.testing.tiny_data.ensure_tiny_data('data/tiny')`. Labels follow
# ADE20K
# (0 = other, ignored by reduce_zero_label=True; 150 classes). Paths are
# relative to the working directory.
_base_ = 'mmseg::_base_/datasets/ade20k.py'

data_root = 'data/tiny/ade20k/'
crop_size = (64, 64)
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    # Up-scaling only (ratio >= 1), so every crop is a full 64x64: the
    # whitening hook stacks a batch of training images, which needs equal
    # sizes.
    dict(
        type='RandomResize',
        scale=(128, 64),
        ratio_range=(1.0, 1.5),
        keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(128, 64), keep_ratio=True),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs'),
]
train_dataloader = dict(
    batch_size=4,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(data_root=data_root, pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=1,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(data_root=data_root, pipeline=test_pipeline))
test_dataloader = val_dataloader
# `tools/test.py --tta`: mmseg's multi-scale + flip test-time augmentation
# (as in its ade20k base) at the scale of the tiny images.
tta_pipeline = [
    dict(type='LoadImageFromFile', backend_args=None),
    dict(
        type='TestTimeAug',
        transforms=[
            [dict(type='Resize', scale_factor=r, keep_ratio=True)
             for r in (0.75, 1.0, 1.25)],
            [dict(type='RandomFlip', prob=0., direction='horizontal'),
             dict(type='RandomFlip', prob=1., direction='horizontal')],
            [dict(type='LoadAnnotations')],
            [dict(type='PackSegInputs')],
        ])
]
