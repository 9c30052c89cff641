# Tiny SPT Mask R-CNN: ./mask_rcnn_bpt_tiny.py with shallow SPT prompts
# (m = 8, initialised with patch embeddings drawn from the 16 training
# images by BPTWhiteningHook) instead of BPT-bilinear ones. It shows the SPT
# pipeline works end to end on a CPU; it is not a benchmark.
_base_ = './mask_rcnn_bpt_tiny.py'

model = dict(
    backbone=dict(
        prompt=dict(_delete_=True, type='SPTPrompt', num_tokens=8)))
custom_hooks = [
    dict(type='TrainableParametersHook'),
    dict(type='RandomStateHook'),
    # Stop at the first NaN/Inf loss or weight, before it is saved.
    dict(type='FiniteCheckHook'),
    dict(type='BPTWhiteningHook', num_images=16),
]
