"""Merge a trainable-only checkpoint with its pretrained backbone.

``TrainableCheckpointHook`` saves prompts, whitening, neck and heads only.
This tool builds the model of CONFIG, loads the pretrained backbone that the
config's ``model.backbone.init_cfg`` names (converting MAE/timm/MoCo v3
layouts as training did), checks it against the fingerprint the checkpoint
recorded, and writes one full checkpoint that any mmdet/mmseg tool loads
without bpt_mm's guard.

Example:
    python tools/merge_checkpoint.py configs/mask_rcnn_bpt.py \
        work_dirs/mask_rcnn_bpt/epoch_36.pth mask_rcnn_bpt_full.pth
"""
import argparse
import os
import os.path as osp
import sys

from mmengine.config import DictAction

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))
from bpt_mm.engine.checkpoint_io import (load_local_checkpoint,  # noqa
                                         write_checkpoint_file)
from bpt_mm.engine.trainable_state import (META_KEY,  # noqa: E402
                                           is_trainable_only,
                                           restore_frozen_backbone)
from bpt_mm.launch import load_config  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('config', help='the config the checkpoint was '
                        'trained with')
    parser.add_argument('checkpoint', help='trainable-only checkpoint')
    parser.add_argument('out', help='where to write the full checkpoint')
    parser.add_argument('--backbone', help='pretrained backbone file '
                        '(default: model.backbone.init_cfg.checkpoint)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config keys')
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = load_config(args.config, args.cfg_options)
    if args.backbone:
        cfg.model.backbone.init_cfg = dict(type='Pretrained',
                                           checkpoint=args.backbone)
    from mmengine.registry import MODELS, init_default_scope
    init_default_scope(cfg.default_scope)
    model = MODELS.build(cfg.model)
    ckpt = load_local_checkpoint(args.checkpoint, map_location='cpu')
    if not is_trainable_only(ckpt, args.checkpoint):
        raise SystemExit(f'{args.checkpoint} is not a trainable-only '
                         f'checkpoint (no meta.{META_KEY}.trainable_only); '
                         f'nothing to merge')
    small = os.path.getsize(args.checkpoint)
    filled = restore_frozen_backbone(model, ckpt, source=args.checkpoint)
    # Everything the model has must now be there, and nothing else.
    model.load_state_dict(ckpt['state_dict'], strict=True)
    meta = dict(ckpt.get('meta') or {})
    meta[META_KEY] = dict(meta[META_KEY], trainable_only=False,
                          merged_from=osp.abspath(args.checkpoint))
    # Atomic (never a half-written file under `out`), and in the plain form
    # that torch.load(weights_only=True) reads.
    write_checkpoint_file(dict(meta=meta, state_dict=ckpt['state_dict']),
                          args.out)
    print(f'merged {len(filled)} backbone tensors: {args.checkpoint} '
          f'({small / 2**20:.2f} MiB) -> {args.out} '
          f'({os.path.getsize(args.out) / 2**20:.2f} MiB)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
