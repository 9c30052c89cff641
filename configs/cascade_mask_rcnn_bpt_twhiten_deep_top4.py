# Lean deep BPT-tWhiten: prompts P and trainable W only at blocks
# 8-11.
# Paper row: none (no Cascade Mask R-CNN result for this variant).
_base_ = './cascade_mask_rcnn_bpt_twhiten.py'

model = dict(
    backbone=dict(prompt=dict(depth='deep', layers=(8, 9, 10, 11))))
