# SPT-deep baseline: m = 100 prompt tokens at each of the 12 blocks (as the
# VPT-deep config; the authors' classification runs use 20), block i's
# initialised with 100 patch tokens drawn from block i's input on the
# training images, the earlier blocks' prompts already in place.
# Paper row: Mask R-CNN, SPT-D (AP box 37.85 / AP mask 34.71).
_base_ = './mask_rcnn_spt.py'

model = dict(backbone=dict(prompt=dict(depth='deep')))
