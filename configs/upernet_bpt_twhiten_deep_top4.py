# Lean deep BPT-tWhiten: prompts P and trainable W only at blocks
# 8-11.
# Paper row: none (the paper reports no ADE20K result).
_base_ = './upernet_bpt_twhiten.py'

model = dict(
    backbone=dict(prompt=dict(depth='deep', layers=(8, 9, 10, 11))))
