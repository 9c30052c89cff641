# VPT-deep baseline: m = 100 plain prompt tokens at each of the 12
# blocks.
# Paper row: none (the paper reports no ADE20K result).
_base_ = './upernet_vpt.py'

model = dict(backbone=dict(prompt=dict(depth='deep')))
