# Deep BPT-bilinear as the authors' deep setting: coefficients A
# (m = 100, p = 100) at all 12 blocks, the basis B trained only at
# the top 4 blocks (8-11) and kept at its whitening initialisation
# below (PromptedViT's default for depth='deep'). The paper does not
# publish m and p of its deep detector; these are its shallow ones.
# Paper row: Mask R-CNN, BPT-D (AP box 39.67 / AP mask 36.42).
_base_ = './mask_rcnn_bpt.py'

model = dict(backbone=dict(prompt=dict(depth='deep')))
