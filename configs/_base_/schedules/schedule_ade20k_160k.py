# 160k iterations on ADE20K as mmseg's MAE UperNet setting: AdamW, lr 1e-4,
# betas (0.9, 0.999), weight decay 0.05 for a total batch of 16 (8 GPUs x 2),
# a 1500-iteration linear warm-up, then linear (power 1) decay to 0.
# LayerDecayOptimWrapperConstructor leaves frozen weights out of the
# optimizer and exempts norms, biases, position embedding, class token and
# prompts from weight decay; layer_decay_rate=1.0 means no layer-wise decay
# (the full fine-tuning config uses mmseg's MAE value, 0.65).
_base_ = 'mmseg::_base_/schedules/schedule_160k.py'

optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    constructor='LayerDecayOptimWrapperConstructor',
    optimizer=dict(
        type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05),
    paramwise_cfg=dict(layer_decay_rate=1.0))

param_scheduler = [
    dict(
        type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0,
        end=1500),
    dict(
        type='PolyLR',
        eta_min=0.0,
        power=1.0,
        begin=1500,
        end=160000,
        by_epoch=False),
]
