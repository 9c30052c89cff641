# Lean deep BPT-fWhiten: prompts P only at blocks 8-11, each
# through its block's frozen whitening W.
# Paper row: none (the paper reports no ADE20K result).
_base_ = './upernet_bpt_fwhiten.py'

model = dict(
    backbone=dict(prompt=dict(depth='deep', layers=(8, 9, 10, 11))))
