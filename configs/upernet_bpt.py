# Shallow BPT-bilinear UperNet on ADE20K (512x512 crops, 160k iterations)
# with a frozen MAE ViT-B/16. The paper reports no ADE20K result: this is
# bpt_mm's own extension, with the prompt of the authors' detection setting
# (m = 100, p = 100, B whitening-initialised from 100 training images) and
# mmseg's MAE UperNet conventions for the rest (see the _base_ files).
_base_ = [
    './_base_/models/upernet_prompted_vit.py',
    'mmseg::_base_/datasets/ade20k.py',
    './_base_/schedules/schedule_ade20k_160k.py',
    'mmseg::_base_/default_runtime.py',
    './_base_/custom_hooks.py',
]

crop_size = (512, 512)
model = dict(
    data_preprocessor=dict(size=crop_size),
    backbone=dict(
        prompt=dict(
            type='BilinearPrompt', num_tokens=100, rank=100,
            whitening_init=True)),
    test_cfg=dict(mode='slide', crop_size=crop_size, stride=(341, 341)))

# mmseg's MAE setting: 8 GPUs x 2 images.
train_dataloader = dict(batch_size=2)
val_dataloader = dict(batch_size=1)
test_dataloader = val_dataloader

custom_hooks = _base_.bpt_hooks
