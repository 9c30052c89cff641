# BPT-fWhiten: prompts P (m = 100) through a frozen ZCA whitening W
# (P~ = P W^T), W computed from 100 training images by
# BPTWhiteningHook.
# Paper row: none (no Cascade Mask R-CNN result for this variant).
_base_ = './cascade_mask_rcnn_bpt.py'

model = dict(
    backbone=dict(
        prompt=dict(
            _delete_=True,
            type='WhitenedPrompt',
            num_tokens=100,
            tunable=False)))
