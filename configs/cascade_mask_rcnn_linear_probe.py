# Linear probing baseline: frozen backbone without prompts; only the
# neck and the heads train.
# Paper row: Cascade Mask R-CNN, linear probing (AP box 35.12 / AP mask 31.29).
_base_ = './cascade_mask_rcnn_bpt.py'

model = dict(backbone=dict(prompt=None))
custom_hooks = [
    dict(type='TrainableParametersHook'),
    dict(type='TrainableCheckpointHook'),
    dict(type='RandomStateHook'),
    # Stop at the first NaN/Inf loss or weight, before it is saved.
    dict(type='FiniteCheckHook'),
]
