"""Train a bpt_mm config (mmdet detection or mmseg segmentation).

The flags are mmdet's and mmseg's (``tools/train.py`` there); the config's
``default_scope`` decides which library runs it. ``bpt_mm`` is imported
first, so its models and hooks are registered whatever the config imports.

Examples:
    python tools/train.py configs/mask_rcnn_bpt.py
    python tools/train.py configs/tiny/upernet_bpt_tiny.py --work-dir w
    python tools/train.py CONFIG --resume            # the latest checkpoint
    python tools/train.py CONFIG --resume w/iter_40.pth
    bash tools/dist_train.sh CONFIG 8                # 8 processes
"""
import argparse
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))
from bpt_mm.data_check import check_data_sets  # noqa: E402
from bpt_mm.launch import (AMP_DTYPES, add_common_arguments,  # noqa: E402
                           build_runner, check_data_paths,
                           check_load_from_checkpoint,
                           check_resume_checkpoint,
                           check_whitening_source, config_from_args,
                           enable_amp, resolve_auto_resume,
                           set_finite_check)
from bpt_mm.models.checkpoint_source import is_local_path  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Train a bpt_mm model',
                                     allow_abbrev=False)
    parser.add_argument('config', help='train config file path')
    add_common_arguments(parser, 'train_cfg.max_iters=20')
    parser.add_argument('--amp', action='store_true',
                        help='mixed-precision training (CUDA only): bf16 '
                        'where the GPU has it natively, else fp16')
    parser.add_argument('--amp-dtype', choices=sorted(AMP_DTYPES),
                        help='with --amp: this autocast dtype instead of '
                        'the automatic choice')
    parser.add_argument('--auto-scale-lr', action='store_true',
                        help='scale the lr by the real batch size '
                        '(`auto_scale_lr` of the config)')
    parser.add_argument(
        '--allow-non-finite', action='store_true',
        help='train on through NaN/Inf losses and weights (removes '
        'FiniteCheckHook; by default the run stops at the first one)')
    parser.add_argument(
        '--resume', nargs='?', type=str, const='auto',
        help='resume from CKPT (a file, URL or file-backend name such as '
        's3://...), or without a value from the latest checkpoint in the '
        'work dir')
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.amp_dtype and not args.amp:
        raise ValueError('--amp-dtype only applies with --amp')
    cfg = config_from_args(args)
    if args.amp:
        enable_amp(cfg, args.amp_dtype)
    set_finite_check(cfg, enabled=not args.allow_non_finite)
    if args.auto_scale_lr:
        if not cfg.get('auto_scale_lr', {}).get('base_batch_size'):
            raise ValueError('--auto-scale-lr needs '
                             '`auto_scale_lr.base_batch_size` in the config')
        cfg.auto_scale_lr.enable = True
    if args.resume == 'auto':
        # Resolved here rather than by mmengine, which would try to load an
        # empty `last_checkpoint` marker (left by a kill while rewriting it)
        # as the path ''; without a checkpoint the config's load_from stays.
        print(resolve_auto_resume(cfg), file=sys.stderr)
    elif args.resume is not None:
        if is_local_path(args.resume) and not osp.isfile(args.resume):
            raise FileNotFoundError(f'--resume: no checkpoint file '
                                    f'{args.resume!r}')
        cfg.resume, cfg.load_from = True, args.resume
    loaders = ['train_dataloader'] + (
        ['val_dataloader'] if cfg.get('val_cfg') else [])
    check_data_paths(cfg, loaders)
    check_data_sets(cfg, loaders)
    check_whitening_source(cfg)
    runner = build_runner(cfg)
    if cfg.resume and cfg.load_from:
        check_resume_checkpoint(runner.model, cfg.load_from)
    elif cfg.load_from:
        check_load_from_checkpoint(runner.model, cfg.load_from)
    runner.train()


if __name__ == '__main__':
    main()
