# The generated tiny COCO-format instance set (data/tiny/coco: 16 train and 8
# val images of 160x128 with squares, disks and triangles), made by
# `python tools/make_tiny_data.py` or
# `bpt_mm.testing.tiny_data.ensure_tiny_data('data/tiny')`. Paths are relative
# to the working directory.
_base_ = 'mmdet::_base_/datasets/coco_instance.py'

data_root = 'data/tiny/coco/'
metainfo = dict(
    classes=('square', 'disk', 'triangle'),
    palette=[(220, 40, 40), (40, 200, 60), (50, 80, 230)])
image_scale = (160, 128)
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='Resize', scale=image_scale, keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=image_scale, keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(
        type='PackDetInputs',
        meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape',
                   'scale_factor')),
]
train_dataloader = dict(
    batch_size=4,
    num_workers=0,
    persistent_workers=False,
    # Iteration-based training: an endless sampler, as mmdet's iteration
    # configs. With a finite one mmengine restarts the loader after each
    # pass over the 16 images and sleeps 2 s each time.
    sampler=dict(type='InfiniteSampler', shuffle=True),
    dataset=dict(
        data_root=data_root,
        metainfo=metainfo,
        ann_file='annotations/instances_train2017.json',
        data_prefix=dict(img='train2017/'),
        pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=4,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(
        data_root=data_root,
        metainfo=metainfo,
        ann_file='annotations/instances_val2017.json',
        data_prefix=dict(img='val2017/'),
        pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(
    ann_file=data_root + 'annotations/instances_val2017.json',
    metric=['bbox', 'segm'])
test_evaluator = val_evaluator
