# Lean deep BPT-bilinear: prompts (A and B, m = 100, p = 100) only
# at blocks 8-11, both trained there; blocks 0-7 see no prompt.
# Paper row: none (the paper reports no ADE20K result).
_base_ = './upernet_bpt.py'

model = dict(
    backbone=dict(prompt=dict(depth='deep', layers=(8, 9, 10, 11))))
