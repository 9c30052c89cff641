"""Trainable parameters per group, in the paper's units of 10^-2 M.

Without configs: the built-in variants (ViT-B, m = 100 shallow prompts:
VPT, BPT-fWhiten, BPT-tWhiten, BPT-bilinear p = 25/50/75/100, and the
authors' deep BPT m = p = 50), each a real PromptedViT built on the meta
device. With configs: their whole models (prompts, whitening, backbone,
neck, heads), also built on the meta device, without reading any
checkpoint. Prints a Markdown table (``--out`` also writes it to a file).

Usage:
    python tools/param_table.py                        # built-in variants
    python tools/param_table.py --variants vpt bpt_twhiten --arch large
    python tools/param_table.py configs/mask_rcnn_bpt.py configs/upernet_vpt.py
"""
import argparse
import os.path as osp
import sys

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def build_parser() -> argparse.ArgumentParser:
    from bpt_mm.analysis.param_budget import BUILTIN_VARIANTS
    parser = argparse.ArgumentParser(
        description='Trainable parameters per group (x 1e-2 M).')
    parser.add_argument('configs', nargs='*', help='config files; none: '
                        'the built-in variants')
    parser.add_argument('--variants', nargs='+',
                        choices=list(BUILTIN_VARIANTS),
                        help='built-in variants to list (default all, when '
                        'no config is given)')
    parser.add_argument('--arch', default='base',
                        choices=('tiny', 'small', 'base', 'large', 'huge'),
                        help='ViT of the built-in variants (default base)')
    parser.add_argument('--num-tokens', type=int, default=100,
                        help='m of the built-in shallow variants '
                        '(default 100)')
    parser.add_argument('--out', help='also write the table to this file')
    return parser


def config_row(path: str):
    """:func:`~bpt_mm.analysis.param_budget.budget_row` of a config's model,
    built on the meta device without its pretrained weights."""
    import torch
    from mmengine.config import Config
    from mmengine.registry import MODELS, init_default_scope

    import bpt_mm  # noqa: F401  (registers the models)
    from bpt_mm.analysis.param_budget import budget_row
    cfg = Config.fromfile(path)
    init_default_scope(cfg.get('default_scope', 'mmengine'))
    backbone = cfg.model.get('backbone')
    if isinstance(backbone, dict):
        # Counting needs shapes only: no checkpoint is read.
        backbone.pop('init_cfg', None)
        backbone.pop('pretrained', None)
    if 'pretrained' in cfg.model:
        cfg.model.pretrained = None
    with torch.device('meta'):
        model = MODELS.build(cfg.model)
    return budget_row(model)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.num_tokens < 1:
        parser.error(f'--num-tokens must be a positive integer, got '
                     f'{args.num_tokens}')
    missing = [c for c in args.configs if not osp.isfile(c)]
    if missing:
        parser.error(f'config file(s) not found: {missing}')

    from bpt_mm.analysis.param_budget import builtin_rows, markdown_table
    rows = {}
    if args.variants or not args.configs:
        for name, row in builtin_rows(args.variants, args.arch,
                                      args.num_tokens).items():
            rows[f'{name} (ViT-{args.arch[0].upper()})'] = row
    for path in args.configs:
        rows[osp.splitext(osp.basename(path))[0]] = config_row(path)
    table = markdown_table(rows)
    print('Trainable parameters (x 1e-2 M)\n')
    print(table)
    if args.out:
        with open(args.out, 'w') as f:
            f.write(table + '\n')
    return 0


if __name__ == '__main__':
    sys.exit(main())
