# Linear probing baseline: frozen backbone without prompts; only the
# neck and the heads train.
# Paper row: Mask R-CNN, linear probing (AP box 30.70 / AP mask 28.73).
_base_ = './mask_rcnn_bpt.py'

model = dict(backbone=dict(prompt=None))
custom_hooks = _base_.frozen_hooks
