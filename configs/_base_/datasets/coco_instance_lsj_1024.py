# COCO 2017 instances with ViTDet's large-scale jitter at 1024x1024: random
# resize of the long side to 0.1-2.0 x 1024, a 1024x1024 crop, flip; the
# padding of training batches to 1024x1024 is done by the detector's data
# preprocessor (`lsj_batch_pad` below, in mask_rcnn_bpt.py and
# cascade_mask_rcnn_bpt.py), as in mmdet's own LSJ configs: a `Pad` in this
# pipeline would write the padded size into `img_shape`, and the whitening
# and statistics hooks could no longer leave the padding out (README,
# "Whitening"). At test time the long side is resized to 1024 and padded
# (pixel value 114). The paper does not publish its input size.
_base_ = 'mmdet::_base_/datasets/coco_instance.py'

image_size = (1024, 1024)
train_pipeline = [
    dict(type='LoadImageFromFile', backend_args=_base_.backend_args),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='RandomFlip', prob=0.5),
    dict(
        type='RandomResize',
        scale=image_size,
        ratio_range=(0.1, 2.0),
        keep_ratio=True),
    dict(
        type='RandomCrop',
        crop_type='absolute_range',
        crop_size=image_size,
        recompute_bbox=True,
        allow_negative_crop=True),
    dict(type='FilterAnnotations', min_gt_bbox_wh=(1e-2, 1e-2)),
    dict(type='PackDetInputs'),
]
# Training batches padded to 1024x1024 after normalisation (value 0, the
# mean colour, as detectron2's ViTDet pads), masks too.
lsj_batch_pad = dict(type='BatchFixedSizePad', size=image_size, pad_mask=True)
test_pipeline = [
    dict(type='LoadImageFromFile', backend_args=_base_.backend_args),
    dict(type='Resize', scale=image_size, keep_ratio=True),
    dict(type='Pad', size=image_size, pad_val=dict(img=(114, 114, 114))),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(
        type='PackDetInputs',
        meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape',
                   'scale_factor')),
]
train_dataloader = dict(
    # ViTDet's total batch is 64: e.g. 16 GPUs x 4 images. With another
    # total, scale the learning rate (tools' --auto-scale-lr uses
    # auto_scale_lr.base_batch_size=64).
    batch_size=4,
    # Every crop is 1024x1024, so grouping by aspect ratio buys nothing.
    batch_sampler=None,
    dataset=dict(pipeline=train_pipeline))
val_dataloader = dict(dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader
