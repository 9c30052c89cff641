# VPT-shallow baseline: m = 100 plain prompt tokens before block 0.
# Nothing is whitened, so no BPTWhiteningHook.
# Paper row: Mask R-CNN, VPT-S (AP box 33.98 / AP mask 31.68).
_base_ = './mask_rcnn_bpt.py'

model = dict(
    backbone=dict(
        prompt=dict(_delete_=True, type='VPTPrompt', num_tokens=100)))
custom_hooks = _base_.frozen_hooks
