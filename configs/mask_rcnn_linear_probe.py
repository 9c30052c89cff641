# Linear probing baseline: frozen backbone without prompts; only the
# neck and the heads train.
# Paper row: Mask R-CNN, linear probing (AP box 30.70 / AP mask 28.73).
_base_ = './mask_rcnn_bpt.py'

model = dict(backbone=dict(prompt=None))
custom_hooks = [
    dict(type='TrainableParametersHook'),
    dict(type='TrainableCheckpointHook'),
    dict(type='RandomStateHook'),
    # Stop at the first NaN/Inf loss or weight, before it is saved.
    dict(type='FiniteCheckHook'),
]
