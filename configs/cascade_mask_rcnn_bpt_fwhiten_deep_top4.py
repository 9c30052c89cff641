# Lean deep BPT-fWhiten: prompts P only at blocks 8-11, each
# through its block's frozen whitening W.
# Paper row: none (no Cascade Mask R-CNN result for this variant).
_base_ = './cascade_mask_rcnn_bpt_fwhiten.py'

model = dict(
    backbone=dict(prompt=dict(depth='deep', layers=(8, 9, 10, 11))))
