# Deep BPT-fWhiten: prompts P at all 12 blocks, each through its
# block's frozen whitening W.
# Paper row: none (the paper reports no ADE20K result).
_base_ = './upernet_bpt_fwhiten.py'

model = dict(backbone=dict(prompt=dict(depth='deep')))
