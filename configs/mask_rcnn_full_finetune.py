# Full fine-tuning baseline: every backbone weight trains, no
# prompts. As ViTDet: stochastic depth 0.1 and layer-wise
# learning-rate decay 0.7 (LayerDecayOptimWrapperConstructor).
# Paper row: none (no Mask R-CNN result for this variant).
_base_ = './mask_rcnn_bpt.py'

model = dict(
    backbone=dict(prompt=None, frozen=False, drop_path_rate=0.1))
optim_wrapper = dict(paramwise_cfg=dict(layer_decay_rate=0.7))
custom_hooks = _base_.full_finetune_hooks
# The final LayerNorm of the ViT is trainable but unused (the
# features are the blocks' plain outputs), which DDP must be told.
find_unused_parameters = True
