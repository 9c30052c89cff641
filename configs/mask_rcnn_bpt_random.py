# BPT-bilinear with a random basis B (Xavier-uniform, as the authors'
# code when B is not whitened) instead of a whitening-initialised
# one: the ablation of the initialisation. Nothing is computed from
# data, so no BPTWhiteningHook.
# Paper row: none (no Mask R-CNN result for this variant).
_base_ = './mask_rcnn_bpt.py'

model = dict(backbone=dict(prompt=dict(whitening_init=False)))
custom_hooks = _base_.bpt_random_hooks
