# The `custom_hooks` lists of the configs, each written once. mmengine
# replaces a list on inheritance (it merges dicts only), so a config whose
# hooks differ from its base's would repeat the whole list; instead every
# config sets `custom_hooks = _base_.<one of these>`. This file is in the
# `_base_` of mask_rcnn_bpt.py, cascade_mask_rcnn_bpt.py and upernet_bpt.py,
# so the lists reach every config built on them (as top-level keys of the
# resolved config, which nothing else reads; the two single hooks below
# start with '__', which mmengine leaves out of the config).

# A frozen backbone (linear probing, VPT): the trainable-parameter report,
# checkpoints of the trainable weights only, exact resumes.
frozen_hooks = [
    dict(type='TrainableParametersHook'),
    dict(type='TrainableCheckpointHook'),
    dict(type='RandomStateHook'),
    # Stop at the first NaN/Inf loss or weight, before it is saved.
    dict(type='FiniteCheckHook'),
]
# Full fine-tuning: every weight trains, so whole checkpoints.
full_finetune_hooks = [hook for hook in frozen_hooks
                       if hook['type'] != 'TrainableCheckpointHook']
# Whitening (BPT) or prototypes (SPT) from the paper's 100 training images
# (100 x 4096 patches at 1024 px, 100 x 1024 at 512 px crops: >> d = 768),
# before the first iteration.
__data_init_hook = dict(type='BPTWhiteningHook', num_images=100)
# Per prompted block: |P~|, kurtosis of the prompt logits, drift of a
# trained W; every logger interval (50).
__prompt_stats_hook = dict(type='PromptStatsHook', interval=50)
# BPT prompts.
bpt_hooks = frozen_hooks + [__data_init_hook, __prompt_stats_hook]
# BPT-bilinear with a random basis: nothing computed from data.
bpt_random_hooks = frozen_hooks + [__prompt_stats_hook]
# SPT prompts: prototypes, no BPT statistics.
spt_hooks = frozen_hooks + [__data_init_hook]
