# SPT-shallow baseline (self-prompt tuning, ICML 2024): m = 100 prompt
# tokens before block 0, of VPT's form (P~ = P, 76,800 trainable), whose
# initial values are 100 patch embeddings (before the position embedding)
# drawn from the training images, as in the authors' SPT code
# (init='sample'; 'kmeans', 'mean_pool' and 'max_pool' are the
# alternatives). BPTWhiteningHook computes them from the same 100 training
# images it would whiten with, before the first iteration.
# Paper row: Mask R-CNN, SPT-S (AP box 36.46 / AP mask 33.70).
_base_ = './mask_rcnn_vpt.py'

model = dict(
    backbone=dict(
        prompt=dict(_delete_=True, type='SPTPrompt', num_tokens=100)))
custom_hooks = _base_.spt_hooks
