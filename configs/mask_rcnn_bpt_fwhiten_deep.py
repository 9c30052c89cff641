# Deep BPT-fWhiten: prompts P at all 12 blocks, each through its
# block's frozen whitening W.
# Paper row: none (no Mask R-CNN result for this variant).
_base_ = './mask_rcnn_bpt_fwhiten.py'

model = dict(backbone=dict(prompt=dict(depth='deep')))
