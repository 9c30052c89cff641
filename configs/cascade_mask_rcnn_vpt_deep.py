# VPT-deep baseline: m = 100 plain prompt tokens at each of the 12
# blocks.
# Paper row: none (no Cascade Mask R-CNN result for this variant).
_base_ = './cascade_mask_rcnn_vpt.py'

model = dict(backbone=dict(prompt=dict(depth='deep')))
