# Deep BPT-tWhiten as the authors' deep setting: prompts P at all 12
# blocks, W trained only at the top 4 (8-11) and kept at its ZCA
# value below (PromptedViT's default for depth='deep').
# Paper row: none (no Cascade Mask R-CNN result for this variant).
_base_ = './cascade_mask_rcnn_bpt_twhiten.py'

model = dict(backbone=dict(prompt=dict(depth='deep')))
