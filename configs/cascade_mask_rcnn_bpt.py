# BPT-S (shallow BPT-bilinear) Cascade Mask R-CNN on COCO 2017 with a frozen
# MAE ViT-B/16: the authors' detection setting as far as it is published.
#
# From the paper / the authors: shallow BPT-bilinear prompts, m = 100, p = 100,
# B whitening-initialised from 100 training images (BPTWhiteningHook); simple
# feature pyramid (256 channels, scales 4, 2, 1, 1/2, extra top level,
# LayerNorm); Cascade RoI heads (3 stages) with a 4-conv-1-fc box head;
# 36 epochs with a step at epoch 27.
# From ViTDet (not published by the paper): 1024x1024 large-scale jitter,
# windowed attention, AdamW lr 1e-4 (batch 64) wd 0.1, 2-conv RPN head,
# LayerNorm in the RoI heads. See the _base_ files for details.
# Paper row: Cascade Mask R-CNN, BPT-S (AP box 43.01 / AP mask 38.83).
_base_ = [
    './_base_/models/cascade_mask_rcnn_vit_sfp.py',
    './_base_/datasets/coco_instance_lsj_1024.py',
    './_base_/schedules/schedule_coco_36e.py',
    'mmdet::_base_/default_runtime.py',
    './_base_/custom_hooks.py',
]

model = dict(
    data_preprocessor=dict(batch_augments=[_base_.lsj_batch_pad]),
    backbone=dict(
        prompt=dict(
            type='BilinearPrompt', num_tokens=100, rank=100,
            whitening_init=True)))

custom_hooks = _base_.bpt_hooks

# Evaluate every 6 epochs (and after the last); keep the last 3 checkpoints.
default_hooks = dict(checkpoint=dict(interval=6, max_keep_ckpts=3))
