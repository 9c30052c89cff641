# Linear probing baseline: frozen backbone without prompts; only the
# neck and the heads train.
# Paper row: none (the paper reports no ADE20K result).
_base_ = './upernet_bpt.py'

model = dict(backbone=dict(prompt=None))
custom_hooks = _base_.frozen_hooks
