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
import os
import os.path as osp
import sys

from mmengine.config import DictAction

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))
from bpt_mm.launch import (LAUNCHERS, build_runner,  # noqa: E402
                           default_work_dir, enable_amp, load_config,
                           setup_launcher)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Train a bpt_mm model')
    parser.add_argument('config', help='train config file path')
    parser.add_argument('--work-dir', help='where logs and checkpoints go '
                        '(default: ./work_dirs/<config name>)')
    parser.add_argument('--amp', action='store_true',
                        help='mixed-precision training (CUDA only)')
    parser.add_argument('--auto-scale-lr', action='store_true',
                        help='scale the lr by the real batch size '
                        '(`auto_scale_lr` of the config)')
    parser.add_argument(
        '--resume', nargs='?', type=str, const='auto',
        help='resume from CKPT, or without a value from the latest '
        'checkpoint in the work dir')
    parser.add_argument(
        '--cfg-options', nargs='+', action=DictAction,
        help='override config keys, e.g. train_cfg.max_iters=20')
    parser.add_argument('--launcher', choices=LAUNCHERS, default='none',
                        help='job launcher')
    # torch < 2 launchers pass --local_rank, torchrun sets LOCAL_RANK.
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args(argv)
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    cfg = load_config(args.config, args.cfg_options)
    cfg.work_dir = args.work_dir or cfg.get('work_dir') or \
        default_work_dir(args.config)
    setup_launcher(cfg, args.launcher)
    if args.amp:
        enable_amp(cfg)
    if args.auto_scale_lr:
        if not cfg.get('auto_scale_lr', {}).get('base_batch_size'):
            raise ValueError('--auto-scale-lr needs '
                             '`auto_scale_lr.base_batch_size` in the config')
        cfg.auto_scale_lr.enable = True
    if args.resume == 'auto':
        cfg.resume, cfg.load_from = True, None
    elif args.resume is not None:
        if not osp.isfile(args.resume):
            raise FileNotFoundError(f'--resume: no checkpoint file '
                                    f'{args.resume!r}')
        cfg.resume, cfg.load_from = True, args.resume
    runner = build_runner(cfg)
    runner.train()


if __name__ == '__main__':
    main()
