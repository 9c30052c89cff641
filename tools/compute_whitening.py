"""Compute BPT whitening matrices once and save them to a file.

Builds the model of an mmengine/mmdet/mmseg config (pretrained weights from
its ``init_cfg``, or ``--checkpoint``), runs ``--num-images`` images of the
config's ``train_dataloader`` through its PromptedViT backbone and saves the
per-block ZCA matrices (see :mod:`bpt_mm.whitening.collect` and
:mod:`bpt_mm.whitening.io`). Options are
those of the config's ``BPTWhiteningHook`` entry in ``custom_hooks`` when
there is one; command-line flags override them. Use the file with
``custom_hooks=[dict(type='BPTWhiteningHook', whitening_file=FILE)]``.

Usage:
    python tools/compute_whitening.py CONFIG --out FILE [--checkpoint CKPT]
        [--num-images 100] [--eps 1e-5] [--source block_input|norm1]
        [--tokens patch|all] [--center|--no-center]
        [--statistic paper|authors] [--product qk|kq|authors|authors_mae]
        [--bilinear-init random|eigen|identity] [--seed 0] [--allow-few-tokens]
        [--device cuda|cpu] [--cfg-options KEY=VALUE ...]
"""
import argparse
import os.path as osp
import sys

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

#: Hook option -> command-line destination.
OPTIONS = ('num_images', 'eps', 'source', 'tokens', 'center', 'statistic',
           'product', 'bilinear_init', 'seed', 'allow_few_tokens')


def parse_args(argv=None):
    from mmengine.config import DictAction

    from bpt_mm.models.vit import TOKEN_SETS, TOKEN_SOURCES
    from bpt_mm.whitening.options import (BASIS_MODES, NUM_IMAGES, QK_ORDERS,
                                          SEED, STATISTICS, WhiteningOptions)
    parser = argparse.ArgumentParser(
        description='Compute BPT whitening matrices and save them.')
    parser.add_argument('config', help='config file')
    parser.add_argument('--out', required=True, help='output file (.pth)')
    parser.add_argument('--checkpoint', help='checkpoint to load after '
                        'init_weights()')

    def default(value) -> str:
        # What an unset flag gives: the config's hook entry, else the
        # hook's own default (WhiteningOptions holds the whitening ones).
        return f'default: the hook entry, else {value!r}'

    parser.add_argument('--num-images', type=int, help='images to use '
                        f'({default(NUM_IMAGES)})')
    parser.add_argument('--eps', type=float,
                        help=default(WhiteningOptions.eps))
    parser.add_argument('--source', choices=TOKEN_SOURCES,
                        help=default(WhiteningOptions.source))
    parser.add_argument('--tokens', choices=TOKEN_SETS,
                        help=default(WhiteningOptions.tokens))
    parser.add_argument('--center', action=argparse.BooleanOptionalAction,
                        default=None, help=default(WhiteningOptions.center))
    parser.add_argument('--statistic', choices=STATISTICS,
                        help=default(WhiteningOptions.statistic))
    parser.add_argument('--product', choices=QK_ORDERS,
                        help=default(WhiteningOptions.product))
    parser.add_argument('--bilinear-init', choices=BASIS_MODES,
                        help=default(WhiteningOptions.bilinear_init))
    parser.add_argument('--seed', type=int, help=default(SEED))
    parser.add_argument('--allow-few-tokens', action='store_true',
                        default=None, help='whiten even with fewer tokens '
                        'than channels (refused by default)')
    parser.add_argument('--device', default=None,
                        help="default: 'cuda' when available, else 'cpu'")
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config entries, KEY=VALUE')
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from mmengine.config import Config
    from mmengine.logging import MMLogger
    from mmengine.registry import init_default_scope
    from mmengine.runner import Runner

    import bpt_mm  # noqa: F401  (registers the models and the hook)
    from bpt_mm.engine.whitening_hook import (BPTWhiteningHook,
                                              hook_options_from_config,
                                              images_to_use,
                                              preprocessed_batches)
    from bpt_mm.launch import (build_prompted_model, check_whitening_output,
                               resolve_device, seed_as_the_runner)
    from bpt_mm.whitening.collect import (format_whitening_table,
                                          run_whitening, whitening_blocks)
    from bpt_mm.whitening.io import save_whitening

    # The current logger: init_weights' per-parameter report stays quiet.
    MMLogger.get_instance('compute_whitening', log_level='WARNING')
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    init_default_scope(cfg.get('default_scope', 'mmengine'))

    options = hook_options_from_config(cfg)
    options.pop('whitening_file', None)  # this tool computes
    for key in OPTIONS:
        value = getattr(args, key)
        if value is not None:
            options[key] = value
    try:
        # The hook validates the options exactly as a config would, and
        # holds them as one WhiteningOptions.
        hook = BPTWhiteningHook(**options)
    except (TypeError, ValueError) as exc:
        print(f'compute_whitening: error: {exc}', file=sys.stderr)
        return 2

    try:
        device = resolve_device(args.device)
        check_whitening_output(args.out)
    except ValueError as exc:
        print(f'compute_whitening: error: {exc}', file=sys.stderr)
        return 2
    # A random (tiny) backbone gets the weights training starts from, so
    # that the training run's fingerprint check accepts the file.
    seed_as_the_runner(cfg)
    try:
        model, backbone = build_prompted_model(cfg, args.checkpoint, device)
    except ValueError as exc:
        print(f'{args.config}: {exc}', file=sys.stderr)
        return 1
    if not whitening_blocks(backbone):
        config = backbone.prompt_config
        print(f'{args.config}: no prompt of this model needs whitening '
              f'(prompt type {None if config is None else config.type})',
              file=sys.stderr)
        return 1
    if not cfg.get('train_dataloader'):
        print(f'{args.config}: the config has no train_dataloader',
              file=sys.stderr)
        return 1
    seed = (cfg.get('randomness') or {}).get('seed')
    loader = Runner.build_dataloader(cfg.train_dataloader, seed=seed)
    try:
        num_images, note = images_to_use(loader, hook.num_images,
                                         'whitening')
    except ValueError as exc:
        print(f'{args.config}: {exc}', file=sys.stderr)
        return 1
    if note is not None:
        print(f'compute_whitening: warning: {note}', file=sys.stderr)
    # The hook checked every option when it was built.
    results = run_whitening(
        backbone, preprocessed_batches(model, loader), hook.options,
        num_images, distributed=False, blocks=None, seed=hook.seed,
        allow_few_tokens=hook.allow_few_tokens)
    save_whitening(args.out, results, backbone, hook.options)
    print(f'whitening of {len(results)} block(s) from '
          f"{min(r['num_images'] for r in results.values())} images, "
          f'{hook.options}, saved to {args.out}')
    print(format_whitening_table(results))
    return 0


if __name__ == '__main__':
    sys.exit(main())
