# BPT-tWhiten: prompts P (m = 100) through a whitening W that is
# initialised by ZCA (100 training images, BPTWhiteningHook) and
# then trained.
# Paper row: none (no Mask R-CNN result for this variant).
_base_ = './mask_rcnn_bpt.py'

model = dict(
    backbone=dict(
        prompt=dict(
            _delete_=True,
            type='WhitenedPrompt',
            num_tokens=100,
            tunable=True)))
