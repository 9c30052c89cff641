#!/usr/bin/env python
"""Make the tiny COCO and ADE20K data sets used by `make demo` and tests.

Examples:
    python tools/make_tiny_data.py                 # data/tiny, if missing
    python tools/make_tiny_data.py --force         # regenerate
    python tools/make_tiny_data.py --out /tmp/tiny --seed 1 --num-train 4

The sets are only (re)written when their manifest is missing or differs
from the arguments (see bpt_mm.testing.tiny_data.ensure_tiny_data).
"""
import argparse
import importlib.util
import os.path as osp
import sys
from types import ModuleType
from typing import List, Optional


def load_tiny_data() -> ModuleType:
    """Import bpt_mm/testing/tiny_data.py without importing the bpt_mm
    package.

    ``bpt_mm/__init__`` imports the models (torch, timm, mm*), seconds of
    start-up that data generation (numpy + cv2 only) does not need; loading
    the file by path also works from a checkout that is not installed.
    Where the file is not next to tools/ (e.g. a copy of this script inside
    an installed package), the installed ``bpt_mm.testing.tiny_data`` is used.
    """
    path = osp.join(osp.dirname(osp.dirname(osp.abspath(__file__))), 'bpt_mm',
                    'testing', 'tiny_data.py')
    if not osp.isfile(path):
        from bpt_mm.testing import tiny_data
        return tiny_data
    name = 'bpt_mm_tiny_data'
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description='Generate the tiny synthetic COCO instances and ADE20K '
        'semantic segmentation sets.')
    parser.add_argument(
        '--out',
        default='data/tiny',
        help='parent folder; sets go to OUT/coco and OUT/ade20k '
        '(default: %(default)s)')
    parser.add_argument('--seed',
                        type=int,
                        default=0,
                        help='seed (default: %(default)s)')
    parser.add_argument(
        '--num-train',
        type=int,
        default=None,
        help='training images per set (default: 16 COCO, 8 ADE20K)')
    parser.add_argument(
        '--num-val',
        type=int,
        default=None,
        help='validation images per set (default: 8 COCO, 4 ADE20K)')
    parser.add_argument('--force',
                        action='store_true',
                        help='regenerate even if the sets are up to date')
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    try:
        out = load_tiny_data().ensure_tiny_data(args.out,
                                                seed=args.seed,
                                                num_train=args.num_train,
                                                num_val=args.num_val,
                                                force=args.force)
    except ValueError as err:
        print(f'make_tiny_data: error: {err}', file=sys.stderr)
        return 2
    coco, ade = out['coco'], out['ade20k']
    for name, entry, what in (
        ('coco', coco, f"{coco['num_annotations']['train']}+"
         f"{coco['num_annotations']['val']} objects of "
         f"{', '.join(coco['classes'])}"),
        ('ade20k', ade, 'ADE ids ' +
         ', '.join(f'{i} ({n})'
                   for i, n in zip(ade['class_ids'], ade['class_names'])))):
        state = 'wrote' if entry['generated'] else 'up to date'
        print(f"{name}: {state} {entry['root']}: "
              f"{entry['num_images']['train']} train + "
              f"{entry['num_images']['val']} val images, {what}")
    print(f"  coco ann files: {coco['train_ann_file']}, "
          f"{coco['val_ann_file']}")
    print(f"  ade20k dirs: {ade['train_img_dir']}, {ade['train_ann_dir']}")
    return 0


if __name__ == '__main__':
    sys.exit(main())
