# VPT-shallow baseline: m = 100 plain prompt tokens before block 0.
# Nothing is whitened, so no BPTWhiteningHook.
# Paper row: none (no Cascade Mask R-CNN result for this variant).
_base_ = './cascade_mask_rcnn_bpt.py'

model = dict(
    backbone=dict(
        prompt=dict(_delete_=True, type='VPTPrompt', num_tokens=100)))
custom_hooks = _base_.frozen_hooks
