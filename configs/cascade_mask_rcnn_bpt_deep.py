# Deep BPT-bilinear as the authors' deep setting: coefficients A
# (m = 100, p = 100) at all 12 blocks, the basis B trained only at
# the top 4 blocks (8-11) and kept at its whitening initialisation
# below (PromptedViT's default for depth='deep'). The paper does not
# publish m and p of its deep detector; these are its shallow ones.
# Paper row: Cascade Mask R-CNN, BPT-D (AP box 44.97 / AP mask 39.69).
_base_ = './cascade_mask_rcnn_bpt.py'

model = dict(backbone=dict(prompt=dict(depth='deep')))
