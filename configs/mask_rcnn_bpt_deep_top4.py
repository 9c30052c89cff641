# Lean deep BPT-bilinear: prompts (A and B, m = 100, p = 100) only
# at blocks 8-11, both trained there; blocks 0-7 see no prompt.
# Paper row: none (no Mask R-CNN result for this variant).
_base_ = './mask_rcnn_bpt.py'

model = dict(
    backbone=dict(prompt=dict(depth='deep', layers=(8, 9, 10, 11))))
