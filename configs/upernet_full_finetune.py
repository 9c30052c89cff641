# Full fine-tuning baseline: every backbone weight trains, no
# prompts. As mmseg's MAE UperNet: stochastic depth 0.1 and layer-wise
# learning-rate decay 0.65 (LayerDecayOptimWrapperConstructor).
# Paper row: none (the paper reports no ADE20K result).
_base_ = './upernet_bpt.py'

model = dict(
    backbone=dict(prompt=None, frozen=False, drop_path_rate=0.1))
optim_wrapper = dict(paramwise_cfg=dict(layer_decay_rate=0.65))
custom_hooks = _base_.full_finetune_hooks
# The final LayerNorm of the ViT is trainable but unused (the
# features are the blocks' plain outputs), which DDP must be told.
find_unused_parameters = True
