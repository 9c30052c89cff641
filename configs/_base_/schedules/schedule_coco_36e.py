# 36 epochs with one step (x0.1) after epoch 27: the authors' detection
# schedule ("about 36 epochs with a step near epoch 27"). The optimizer is
# not published; it follows ViTDet: AdamW, lr 1e-4 for a total batch of 64,
# betas (0.9, 0.999), weight decay 0.1, a 250-iteration linear warm-up.
# LayerDecayOptimWrapperConstructor leaves frozen weights out of the
# optimizer and exempts norms, biases, position embedding, class token and
# prompts from weight decay (ViTDet's convention); layer_decay_rate=1.0
# means no layer-wise decay (the full fine-tuning configs use 0.7).
# ViTDet trains with mixed precision: add --amp (AmpOptimWrapper) on GPUs.
_base_ = 'mmdet::_base_/schedules/schedule_1x.py'

max_epochs = 36
train_cfg = dict(
    type='EpochBasedTrainLoop', max_epochs=max_epochs, val_interval=6)

param_scheduler = [
    dict(
        type='LinearLR', start_factor=0.001, by_epoch=False, begin=0,
        end=250),
    dict(
        type='MultiStepLR',
        begin=0,
        end=max_epochs,
        by_epoch=True,
        milestones=[27],
        gamma=0.1),
]

optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    constructor='LayerDecayOptimWrapperConstructor',
    optimizer=dict(
        type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.1),
    paramwise_cfg=dict(layer_decay_rate=1.0))

# The learning rate above is for a total batch of 64 (ViTDet).
auto_scale_lr = dict(enable=False, base_batch_size=64)
