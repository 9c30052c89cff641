# VPT-deep baseline: m = 100 plain prompt tokens at each of the 12
# blocks.
# Paper row: Mask R-CNN, VPT-D (AP box 34.62 / AP mask 32.63).
_base_ = './mask_rcnn_vpt.py'

model = dict(backbone=dict(prompt=dict(depth='deep')))
