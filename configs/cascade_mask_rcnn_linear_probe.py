# Linear probing baseline: frozen backbone without prompts; only the
# neck and the heads train.
# Paper row: Cascade Mask R-CNN, linear probing (AP box 35.12 / AP mask 31.29).
_base_ = './cascade_mask_rcnn_bpt.py'

model = dict(backbone=dict(prompt=None))
custom_hooks = _base_.frozen_hooks
