"""Convert a trusted mmdet/mmseg/mmengine checkpoint to the weights-only form.

bpt_mm reads checkpoints with ``torch.load(weights_only=True)`` only. A
checkpoint written by plain mmdet/mmseg (without bpt_mm) holds mmengine's
``HistoryBuffer`` and numpy objects, which that loader refuses; so does
torch's legacy (before 1.6) format. This tool reads such a file ONCE with
full unpickling, which runs whatever code the file holds, and therefore
only with ``--trust``: run it only on files whose origin you trust. It
writes a new file that holds the same content in plain form (tensors,
numbers, strings, containers; see ``bpt_mm/engine/plain_state.py``), which
``--resume``, ``load_from``, ``tools/test.py`` and ``torch.load(...,
weights_only=True)`` read.

Example:
    python tools/convert_checkpoint.py --trust \
        mask_rcnn_r50_fpn_1x_coco.pth mask_rcnn_r50_fpn_1x_coco_safe.pth
"""
import argparse
import os
import os.path as osp
import sys
from typing import List, Optional

import torch

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))
from bpt_mm.engine.checkpoint_io import (load_local_checkpoint,  # noqa: E402
                                         write_checkpoint_file)
from bpt_mm.engine.plain_state import from_plain  # noqa: E402


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split('\n')[0],
        epilog='Full unpickling runs any code the input file holds: use '
        '--trust only for files whose origin you trust.')
    parser.add_argument('checkpoint', help='the checkpoint to convert')
    parser.add_argument('out', help='where to write the converted copy (a '
                        'new file; an existing file is never replaced)')
    parser.add_argument('--trust', action='store_true',
                        help='read CHECKPOINT with torch.load(weights_only='
                        'False), i.e. run the code it holds; required')
    parser.add_argument('--drop', nargs='+', default=[], metavar='KEY',
                        help='top-level keys to leave out (e.g. optimizer), '
                        'for content that has no plain form')
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    """Convert; returns 0, or raises SystemExit with a message."""
    args = parse_args(argv)
    src, out = args.checkpoint, args.out
    if not osp.isfile(src):
        raise SystemExit(f'convert_checkpoint: {src!r} is not a file')
    if osp.lexists(out):
        raise SystemExit(f'convert_checkpoint: {out!r} exists; choose a new '
                         f'name (existing files are never replaced)')
    if not args.trust:
        raise SystemExit(
            f'convert_checkpoint: refusing to read {src!r} without --trust. '
            f'Converting loads it with torch.load(weights_only=False), '
            f'which runs any code the file holds; add --trust only if you '
            f'trust where the file comes from.')
    # A file already in the plain form (e.g. converted before) is read back
    # to its objects first, so that converting twice gives the same file.
    checkpoint = from_plain(
        torch.load(src, map_location='cpu', weights_only=False), src)
    for key in args.drop:
        if not isinstance(checkpoint, dict) or key not in checkpoint:
            keys = sorted(map(str, checkpoint)) \
                if isinstance(checkpoint, dict) else []
            raise SystemExit(f'convert_checkpoint: --drop {key!r}: no such '
                             f'top-level key in {src!r} (keys: {keys})')
        del checkpoint[key]
    try:
        write_checkpoint_file(checkpoint, out)
    except TypeError as exc:
        raise SystemExit(f'convert_checkpoint: cannot convert {src!r}: '
                         f'{exc} (leave such a top-level key out with '
                         f'--drop KEY)') from exc
    # Prove the promise: the copy loads with the weights-only loader (a
    # copy that does not is removed: this tool made it a moment ago).
    try:
        load_local_checkpoint(out, map_location='cpu')
    except Exception:
        os.remove(out)
        raise
    print(f'converted {src} ({os.path.getsize(src) / 2**20:.2f} MiB) -> '
          f'{out} ({os.path.getsize(out) / 2**20:.2f} MiB); it loads with '
          f'torch.load(weights_only=True)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
