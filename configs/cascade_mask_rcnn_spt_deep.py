# SPT-deep baseline: m = 100 prompt tokens at each of the 12 blocks (as the
# VPT-deep config; the authors' classification runs use 20), block i's
# initialised with 100 patch tokens drawn from block i's input on the
# training images, the earlier blocks' prompts already in place.
# Paper row: none (no Cascade Mask R-CNN result for this variant).
_base_ = './cascade_mask_rcnn_spt.py'

model = dict(backbone=dict(prompt=dict(depth='deep')))
