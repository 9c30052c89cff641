# Shared by the tiny configs (configs/tiny/*.py): a 4-block ViT with 64
# channels, random and frozen (no weights can be downloaded here), shallow
# BPT-bilinear prompts (m = 8, p = 8) whose basis B is whitening-initialised by
# BPTWhiteningHook (as the authors' MAE models), and a short iteration-based
# schedule. Everything is small enough to train on a CPU in about a minute or
# less: the tiny configs show that the pipelines work end to end; they are not
# benchmarks.
#
# Each tiny config lists this file among its _base_ files and takes the
# backbone from `_base_.tiny_backbone`. The keys here must not appear in
# mmdet's or mmseg's base files (bases may not share keys), which is why
# default_hooks and log_processor are set in each tiny config, as is the
# schedule's length (max_iters).
custom_imports = dict(imports=['bpt_mm'], allow_failed_imports=False)

embed_dims = 64
tiny_backbone = dict(
    type='PromptedViT',
    arch=dict(embed_dims=embed_dims, num_layers=4, num_heads=4, mlp_ratio=2.0),
    img_size=128,
    patch_size=16,
    out_indices=(-1, ),
    frozen=True,
    prompt=dict(
        type='BilinearPrompt', num_tokens=8, rank=8, whitening_init=True))

# Each tiny config sets max_iters, and val_interval = checkpoint interval =
# max_iters, so it evaluates and saves once, at the end.
train_cfg = dict(type='IterBasedTrainLoop')
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
# The full-size configs' constructor: frozen weights stay out of the
# optimizer; norms, biases and prompts are not weight-decayed; 1.0 = no
# layer-wise decay.
optim_wrapper = dict(
    type='OptimWrapper',
    constructor='LayerDecayOptimWrapperConstructor',
    optimizer=dict(type='AdamW', lr=2e-3, weight_decay=0.05),
    paramwise_cfg=dict(layer_decay_rate=1.0),
    clip_grad=dict(max_norm=5.0))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=10),
]
custom_hooks = [
    dict(type='TrainableParametersHook'),
    dict(type='RandomStateHook'),
    # Stop at the first NaN/Inf loss or weight, before it is saved.
    dict(type='FiniteCheckHook'),
    # 16 images x 80 patches = 1280 tokens >= d = 64; eps is relative to the
    # spectrum and larger than the paper-size default because a random tiny
    # ViT gives a badly conditioned Sigma.
    dict(type='BPTWhiteningHook', num_images=16, eps=1e-3),
    # Per prompted block: |P~|, prompt-logit kurtosis (and the drift of a
    # trained W); every 10 iterations, the tiny configs' logging interval.
    dict(type='PromptStatsHook', interval=10),
]
randomness = dict(seed=0)
