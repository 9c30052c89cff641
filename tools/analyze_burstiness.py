"""Measure the burstiness the BPT paper describes, on your checkpoint and data.

Builds the model of an mmdet/mmseg (or plain mmengine) config, loads its
weights (the backbone's ``init_cfg``, ``--pretrained`` for a ViT file of any
layout bpt_mm reads, ``--checkpoint`` for a checkpoint of the whole model),
runs ``--num-images`` images of the config's training data (the first ones,
in order, through the training pipeline) through the frozen PromptedViT and,
per block, measures the distributions of the tokens ``X`` entering it, of
the entries of ``M = W_q^T W_k``, of ``X~ = M X^T`` and of the whitened
``X~``: kurtosis, top-1% mass and Gaussian / Laplacian / generalised-Gaussian
fits (see :mod:`bpt_mm.analysis.burstiness` and
:mod:`bpt_mm.analysis.token_statistics`).

Writes into ``--out``: ``block_<i>.png`` per block (log-density histograms
with the fitted densities), ``burstiness.json`` and ``burstiness.md``.

Usage:
    python tools/analyze_burstiness.py CONFIG --out DIR [--checkpoint CKPT]
        [--pretrained VIT.pth] [--no-prompts] [--num-images 100]
        [--layers 0 5 11]
        [--eps 1e-9] [--source block_input|norm1] [--tokens patch|all]
        [--product qk|kq|authors|authors_mae] [--center] [--max-values 1000000]
        [--seed 0] [--device cpu|cuda] [--cfg-options KEY=VALUE ...]
"""
import argparse
import copy
import json
import os
import os.path as osp
import sys
import time

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def _positive_int(name):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < 1:
            raise argparse.ArgumentTypeError(
                f'{name} must be a positive integer, got {text!r}')
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    from bpt_mm.analysis.token_statistics import DEFAULT_EPS
    from bpt_mm.models.vit import TOKEN_SETS, TOKEN_SOURCES
    from bpt_mm.whitening.options import (NUM_IMAGES, QK_ORDERS, SEED,
                                          WhiteningOptions)

    def hook_default(value) -> str:
        # The token selection follows the config's whitening hook.
        return f"default the config's BPTWhiteningHook entry, else {value!r}"

    parser = argparse.ArgumentParser(
        description='Burstiness of X, W_q^T W_k, X~ and whitened X~ per '
        'ViT block, with plots.')
    parser.add_argument('config', help='config file')
    parser.add_argument('--out', required=True, help='output directory')
    parser.add_argument('--checkpoint', help='checkpoint of the whole model '
                        '(e.g. from tools/train.py), loaded after '
                        'init_weights()')
    parser.add_argument('--pretrained', help='ViT weights of any layout '
                        'bpt_mm reads (MAE, timm/DeiT, MoCo v3, mmpretrain, '
                        'mmseg); replaces model.backbone.init_cfg')
    parser.add_argument('--no-prompts', action='store_true',
                        help='analyse the backbone without its prompts (the '
                        'pretrained ViT as the paper measured it)')
    parser.add_argument('--num-images', type=_positive_int('--num-images'),
                        default=NUM_IMAGES,
                        help=f'training images (default {NUM_IMAGES})')
    parser.add_argument('--layers', type=int, nargs='+', help='blocks to '
                        'analyse (negative: from the end); default the '
                        'prompted blocks, or block 0 without prompts')
    parser.add_argument('--eps', type=float, default=DEFAULT_EPS,
                        help='relative regulariser of the analysis\' ZCA '
                        f'(default {DEFAULT_EPS:g})')
    parser.add_argument('--source', choices=TOKEN_SOURCES,
                        help='tokens before the block\'s LayerNorm '
                        '(block_input) or after (norm1); '
                        + hook_default(WhiteningOptions.source))
    parser.add_argument('--tokens', choices=TOKEN_SETS,
                        help='patch tokens only, or CLS too (all); '
                        + hook_default(WhiteningOptions.tokens))
    parser.add_argument('--product', choices=QK_ORDERS,
                        help='M = W_q^T W_k (qk), its transpose (kq), the '
                        "authors' W_q W_k^T (authors) or W_q W_q^T "
                        '(authors_mae); '
                        + hook_default(WhiteningOptions.product))
    parser.add_argument('--center', action=argparse.BooleanOptionalAction,
                        default=None, help='centre X~ before whitening; '
                        + hook_default(WhiteningOptions.center))
    parser.add_argument('--max-values', type=_positive_int('--max-values'),
                        default=1_000_000, help='values per quantity in the '
                        'statistics (a seeded random subset; default 10^6)')
    parser.add_argument('--bins', type=_positive_int('--bins'), default=120,
                        help='histogram bins of the PNG panels (default 120)')
    parser.add_argument('--seed', type=int, default=SEED,
                        help='seed of the value subsets, and of the model '
                        "when the config's randomness sets none "
                        f'(default {SEED})')
    parser.add_argument('--device', default=None,
                        help="default: 'cuda' when available, else 'cpu'")
    from mmengine.config import DictAction
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config entries, KEY=VALUE')
    return parser


def _data_roots(dataset_cfg):
    """``data_root`` entries of a dataset config and the datasets it wraps
    (RepeatDataset, ConcatDataset...), with their config keys."""
    found = []

    def visit(cfg, key):
        if isinstance(cfg, dict):
            if cfg.get('data_root'):
                found.append((f'{key}.data_root', cfg['data_root']))
            if 'dataset' in cfg:
                visit(cfg['dataset'], f'{key}.dataset')
            for j, sub in enumerate(cfg.get('datasets') or []):
                visit(sub, f'{key}.datasets[{j}]')
    visit(dataset_cfg, 'train_dataloader.dataset')
    return found


def build_loader(cfg):
    """The config's training loader, reading the first images in order."""
    from mmengine.runner import Runner
    loader_cfg = cfg.get('train_dataloader')
    if not loader_cfg:
        raise ValueError('the config has no `train_dataloader`: the analysis '
                         'reads images from the training data')
    for key, root in _data_roots(loader_cfg.get('dataset')):
        if not osp.isdir(root):
            raise ValueError(
                f'{key} = {root!r} does not exist (relative to the working '
                f'directory {os.getcwd()}); run from the directory the '
                'config expects, or set it with --cfg-options '
                f'{key}=PATH (tiny configs: python tools/make_tiny_data.py)')
    loader_cfg = copy.deepcopy(loader_cfg)
    # The first images in order, each once: an infinite or shuffling
    # sampler would repeat images or change them from run to run.
    loader_cfg['sampler'] = dict(type='DefaultSampler', shuffle=False)
    try:
        return Runner.build_dataloader(loader_cfg, seed=0)
    except FileNotFoundError as exc:
        raise ValueError(f'the training data set could not be read: {exc}; '
                         'check train_dataloader.dataset (data_root, '
                         'ann_file, data_prefix)') from exc


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not osp.isfile(args.config):
        parser.error(f'config file not found: {args.config!r}')
    for flag in ('checkpoint', 'pretrained'):
        path = getattr(args, flag)
        if path is not None and not osp.isfile(path):
            parser.error(f'--{flag}: file not found: {path!r}')
    start = time.perf_counter()

    from mmengine.config import Config
    from mmengine.logging import MMLogger
    from mmengine.registry import init_default_scope

    import bpt_mm  # noqa: F401  (registers the models)
    from bpt_mm.analysis.report import (json_summary, markdown_summary,
                                        plot_block)
    from bpt_mm.analysis.token_statistics import (analyse_backbone,
                                                  resolve_blocks)
    from bpt_mm.engine.whitening_hook import (hook_options_from_config,
                                              preprocessed_batches)
    from bpt_mm.launch import (build_prompted_model, resolve_device,
                               seed_as_the_runner)
    from bpt_mm.whitening.options import WhiteningOptions

    MMLogger.get_instance('analyze_burstiness', log_level='WARNING')
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    init_default_scope(cfg.get('default_scope', 'mmengine'))

    # Token selection as the config's whitening hook, flags override.
    options = {k: v for k, v in hook_options_from_config(cfg).items()
               if k in ('source', 'tokens', 'product', 'center')}
    for key in ('source', 'tokens', 'product', 'center'):
        if getattr(args, key) is not None:
            options[key] = getattr(args, key)
    try:
        # Built once here; the analysis uses it as it is.
        whitening_options = WhiteningOptions(eps=args.eps, **options)
    except ValueError as exc:
        parser.error(str(exc))

    if args.no_prompts:
        # Prompts change the tokens of every block above the first prompted
        # one; without them the frozen ViT is measured as pretrained.
        cfg.model.backbone.prompt = None
    if args.pretrained:
        cfg.model.backbone.init_cfg = dict(type='Pretrained',
                                           checkpoint=args.pretrained)
    try:
        device = resolve_device(args.device)
    except ValueError as exc:
        parser.error(str(exc))
    seed_as_the_runner(cfg, args.seed)
    try:
        loader = build_loader(cfg)
        model, backbone = build_prompted_model(cfg, args.checkpoint, device)
        blocks = resolve_blocks(backbone, args.layers)
        results = analyse_backbone(
            backbone, preprocessed_batches(model, loader), blocks,
            num_images=args.num_images, options=whitening_options,
            max_values=args.max_values, seed=args.seed)
    except ValueError as exc:
        parser.error(str(exc))

    os.makedirs(args.out, exist_ok=True)
    name = osp.splitext(osp.basename(args.config))[0]
    for block, result in results.items():
        path = osp.join(args.out, f'block_{block}.png')
        size = plot_block(result, block, path, title=name, bins=args.bins)
        print(f'wrote {path} ({size[0]}x{size[1]})')
    seen = next(iter(results.values()))['num_images']
    if seen < args.num_images:
        print(f'note: the training data gave {seen} images, fewer than '
              f'--num-images {args.num_images}; all {seen} were used')
    seconds = time.perf_counter() - start
    header = {
        'config': args.config,
        'checkpoint': args.checkpoint,
        'pretrained': args.pretrained or (backbone.pretrained_checkpoint),
        'prompts': 'removed (--no-prompts)' if args.no_prompts else
        None if backbone.prompt_config is None else
        backbone.prompt_config.type,
        'images': seen,
        'blocks': blocks,
        'token selection': dict(tokens=whitening_options.tokens,
                                source=whitening_options.source,
                                product=whitening_options.product,
                                center=whitening_options.center),
        'whitening eps (relative)': whitening_options.eps,
        'seconds': round(seconds, 1),
    }
    with open(osp.join(args.out, 'burstiness.json'), 'w') as f:
        json.dump(dict(header, results=json_summary(results)), f, indent=1)
    markdown = markdown_summary(results, header)
    with open(osp.join(args.out, 'burstiness.md'), 'w') as f:
        f.write(markdown + '\n')
    print(markdown)
    print(f'analysis of {len(blocks)} block(s) on {seen} images took '
          f'{seconds:.1f} s; results in {args.out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
