"""Train-step time, peak memory and inference time of prompt-tuning variants.

Each variant runs in a fresh subprocess (so peak memory is its own), builds
a PromptedViT of ``--arch`` plus a 1x1-conv head on its last feature map,
and measures on the device at hand (CUDA if present, else CPU):

- train step: forward + backward + AdamW step over the trainable
  parameters, median of ``--steps`` after ``--warmup``;
- peak memory: CUDA ``max_memory_allocated``; CPU peak RSS of the process
  (weights, activations and the Python/torch runtime);
- inference: forward under ``torch.no_grad()`` in eval mode at
  ``--infer-size``, median of ``--steps``;
- trainable parameters.

Every figure is also given as a ratio to full fine-tuning. The table is
printed as Markdown and everything is written as JSON.

Examples:
    python tools/benchmark.py --arch base --size 512
    python tools/benchmark.py --variants full_finetune bpt_bilinear_deep_top4
    python tools/benchmark.py --config configs/mask_rcnn_bpt.py --size 512
"""
import argparse
import json
import os
import os.path as osp
import statistics
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

TOP4 = (8, 9, 10, 11)
#: The built-in variants: PromptedViT keyword arguments (prompt, frozen).
VARIANTS: Dict[str, Dict[str, Any]] = {
    'full_finetune': dict(frozen=False, prompt=None),
    'frozen': dict(frozen=True, prompt=None),
    'vpt_shallow': dict(prompt=dict(type='VPTPrompt', num_tokens=100)),
    'vpt_deep': dict(prompt=dict(type='VPTPrompt', num_tokens=100,
                                 depth='deep')),
    'bpt_fwhiten_shallow': dict(prompt=dict(
        type='WhitenedPrompt', num_tokens=100)),
    'bpt_twhiten_shallow': dict(prompt=dict(
        type='WhitenedPrompt', num_tokens=100, tunable=True)),
    'bpt_bilinear_shallow': dict(prompt=dict(
        type='BilinearPrompt', num_tokens=100, rank=100)),
    'bpt_fwhiten_deep_top4': dict(prompt=dict(
        type='WhitenedPrompt', num_tokens=100, depth='deep', layers=TOP4)),
    'bpt_twhiten_deep_top4': dict(prompt=dict(
        type='WhitenedPrompt', num_tokens=100, tunable=True, depth='deep',
        layers=TOP4)),
    'bpt_bilinear_deep_top4': dict(prompt=dict(
        type='BilinearPrompt', num_tokens=100, rank=100, depth='deep',
        layers=TOP4)),
    'bpt_bilinear_deep': dict(prompt=dict(
        type='BilinearPrompt', num_tokens=100, rank=100, depth='deep')),
}
REFERENCE = 'full_finetune'


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--arch', default='base',
                        help="ViT arch: 'tiny', 'small', 'base', 'large' "
                        "(default 'base')")
    parser.add_argument('--size', type=int, default=512,
                        help='square training input size (pixels, default '
                        '512)')
    parser.add_argument('--infer-size', type=int, default=None,
                        help='square inference input size (default: --size)')
    parser.add_argument('--batch', type=int, default=1,
                        help='images per step (default 1)')
    parser.add_argument('--steps', type=int, default=3,
                        help='measured steps (median; default 3)')
    parser.add_argument('--warmup', type=int, default=1,
                        help='steps run before measuring (default 1)')
    parser.add_argument('--variants', nargs='+', default=None,
                        help=f'built-in variants (default: all): '
                        f'{list(VARIANTS)}')
    parser.add_argument('--config', nargs='+', default=[],
                        help='configs whose model.backbone is benchmarked as '
                        'further variants (arch and sizes from the flags)')
    parser.add_argument('--threads', type=int, default=None,
                        help='torch threads on the CPU (default: torch\'s)')
    parser.add_argument('--out', default=osp.join('work_dirs',
                                                  'benchmark.json'),
                        help='where the JSON goes')
    parser.add_argument('--whitening-images', type=int, default=0,
                        help='also time BPTWhiteningHook\'s computation '
                        '(shallow bilinear, whitening-initialised B) over '
                        'this many random images at --size (0: skip)')
    parser.add_argument('--interleaved-inference', action='store_true',
                        help='instead of the table: inference of each '
                        'variant against the un-prompted ViT with the same '
                        'weights, in one process, runs alternating (less '
                        'noisy than comparing processes)')
    parser.add_argument('--interleaved-train', action='store_true',
                        help='instead of the table: train step of each '
                        'variant against full fine-tuning in one process, '
                        'steps alternating')
    parser.add_argument('--worker', help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for key in ('size', 'batch', 'steps'):
        if getattr(args, key) <= 0:
            parser.error(f'--{key} must be a positive int, got '
                         f'{getattr(args, key)}')
    if args.whitening_images < 0:
        parser.error(f'--whitening-images must be >= 0, got '
                     f'{args.whitening_images}')
    if args.warmup < 0:
        parser.error(f'--warmup must be >= 0, got {args.warmup}')
    if args.infer_size is None:
        args.infer_size = args.size
    elif args.infer_size <= 0:
        parser.error(f'--infer-size must be a positive int, got '
                     f'{args.infer_size}')
    unknown = sorted(set(args.variants or []) - set(VARIANTS))
    if unknown:
        parser.error(f'unknown --variants {unknown}; choose from '
                     f'{list(VARIANTS)}')
    for path in args.config:
        if not osp.isfile(path):
            parser.error(f'--config: no such file {path!r}')
    return args


# ------------------------------------------------------------------ worker
def _backbone_kwargs(name: str, args: argparse.Namespace) -> Dict[str, Any]:
    if name in VARIANTS:
        kwargs = dict(VARIANTS[name])
    else:
        from mmengine.config import Config
        kwargs = dict(Config.fromfile(name).model.backbone.to_dict())
        for key in ('type', 'init_cfg', 'pretrained', 'img_size', 'arch'):
            kwargs.pop(key, None)
    kwargs.setdefault('frozen', True)
    prompt = kwargs.get('prompt')
    if prompt is not None:
        # The benchmark measures cost, not accuracy: identity whitening
        # costs the same as a computed one.
        prompt = dict(prompt, allow_identity_whitening=True)
        prompt.pop('whitening_init', None)
        kwargs['prompt'] = prompt
    return dict(kwargs, arch=args.arch, img_size=224)


def _median_seconds(fn, steps: int, warmup: int, sync) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_worker(name: str, args: argparse.Namespace) -> Dict[str, Any]:
    """Measure one variant in this process."""
    import resource

    import torch

    import bpt_mm  # noqa: F401
    from bpt_mm.models import PromptedViT
    if args.threads:
        torch.set_num_threads(args.threads)
    # What the interpreter, torch and the mm libraries hold before any
    # model exists; the same in every variant.
    runtime_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    cuda = torch.cuda.is_available()
    device = torch.device('cuda' if cuda else 'cpu')
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    torch.manual_seed(0)
    backbone = PromptedViT(**_backbone_kwargs(name, args))
    head = torch.nn.Conv2d(backbone.embed_dims, 1, 1)
    backbone.to(device)
    head.to(device)
    params = [p for p in list(backbone.parameters()) + list(head.parameters())
              if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    x = torch.rand(args.batch, 3, args.size, args.size, device=device)

    def train_step():
        loss = head(backbone(x)[-1]).float().pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    backbone.train()
    head.train()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    train_s = _median_seconds(train_step, args.steps, args.warmup, sync)
    frozen_grads = sum(p.grad is not None for p in backbone.parameters()
                       if not p.requires_grad)
    if cuda:
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    model_mb = peak_mb if cuda else peak_mb - runtime_mb

    backbone.eval()
    xi = torch.rand(args.batch, 3, args.infer_size, args.infer_size,
                    device=device)

    def infer():
        with torch.no_grad():
            backbone(xi)

    infer_s = _median_seconds(infer, args.steps, min(args.warmup, 1), sync)
    return dict(
        variant=name, device=str(device), arch=args.arch, size=args.size,
        infer_size=args.infer_size, batch=args.batch,
        trainable_params=sum(p.numel() for p in backbone.parameters()
                             if p.requires_grad),
        train_step_s=train_s, peak_mb=peak_mb, model_mb=model_mb,
        runtime_mb=0.0 if cuda else runtime_mb,
        peak_kind='cuda_max_allocated' if cuda else 'cpu_peak_rss',
        inference_s=infer_s, frozen_params_with_grad=frozen_grads,
        threads=torch.get_num_threads())


WHITENING = '__whitening__'
#: Images in COCO train2017, for the schedule estimate.
COCO_TRAIN_IMAGES = 118287


def run_whitening_worker(args: argparse.Namespace) -> Dict[str, Any]:
    """Time :func:`collect_whitening` as BPTWhiteningHook runs it."""
    import torch

    import bpt_mm  # noqa: F401
    from bpt_mm.models import PromptedViT
    from bpt_mm.whitening.collect import collect_whitening
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    torch.manual_seed(0)
    backbone = PromptedViT(arch=args.arch, prompt=dict(
        type='BilinearPrompt', num_tokens=100, rank=100,
        whitening_init=True)).to(device)
    n, size = args.whitening_images, args.size
    batches = (torch.rand(1, 3, size, size, device=device)
               for _ in range(n))
    start = time.perf_counter()
    collect_whitening(backbone, batches, num_images=n, distributed=False)
    if device.type == 'cuda':
        torch.cuda.synchronize()
    return dict(variant=WHITENING, images=n, size=size,
                seconds=time.perf_counter() - start)


# ----------------------------------------------------------------- driver
def measure(name: str, args: argparse.Namespace) -> Dict[str, Any]:
    """Run one variant in a fresh interpreter and read its JSON line."""
    cmd = [sys.executable, osp.abspath(__file__), '--worker', name,
           '--arch', args.arch, '--size', str(args.size), '--infer-size',
           str(args.infer_size), '--batch', str(args.batch), '--steps',
           str(args.steps), '--warmup', str(args.warmup),
           '--whitening-images', str(args.whitening_images)]
    if args.threads:
        cmd += ['--threads', str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f'variant {name!r} failed:\n{out.stderr[-3000:]}')
    return json.loads(out.stdout.strip().splitlines()[-1])


def with_ratios(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Add ``*_ratio`` fields relative to full fine-tuning (if measured)."""
    ref = next((r for r in rows if r['variant'] == REFERENCE), None)
    for row in rows:
        for key in ('train_step_s', 'peak_mb', 'model_mb', 'inference_s'):
            row[key.rsplit('_', 1)[0] + '_ratio'] = \
                row[key] / ref[key] if ref else None
    return rows


def markdown_table(rows: List[Dict[str, Any]]) -> str:
    def ratio(value: Optional[float]) -> str:
        return '—' if value is None else f'{value:.2f}×'

    cpu = bool(rows) and rows[0]['peak_kind'] == 'cpu_peak_rss'
    peak = 'peak RSS MB' if cpu else 'peak CUDA MB'
    # On the CPU, RSS also holds the runtime (the same in every variant);
    # the second pair of columns is the peak above it.
    extra = ' above runtime MB | × full |' if cpu else ''
    lines = [f'| variant | trainable | train step s | × full | {peak} | '
             f'× full |{extra} inference s | × full |',
             '|---|---:|---:|---:|---:|---:|' + ('---:|---:|' if cpu else '')
             + '---:|---:|']
    for r in rows:
        model = (f" {r['model_mb']:,.0f} | {ratio(r['model_ratio'])} |"
                 if cpu else '')
        lines.append(
            f"| {r['variant']} | {r['trainable_params']:,} | "
            f"{r['train_step_s']:.3f} | {ratio(r['train_step_ratio'])} | "
            f"{r['peak_mb']:,.0f} | {ratio(r['peak_ratio'])} |{model} "
            f"{r['inference_s']:.3f} | {ratio(r['inference_ratio'])} |")
    return '\n'.join(lines)


def whitening_summary(result: Dict[str, Any], rows: List[Dict[str, Any]],
                      args: argparse.Namespace) -> str:
    """The whitening time against training time, in words."""
    text = (f"\nWhitening ({result['images']} images at {result['size']}x"
            f"{result['size']}): {result['seconds']:.1f} s")
    step = next((r['train_step_s'] for r in rows
                 if r['variant'] == 'bpt_bilinear_shallow'), None)
    if step is not None:
        per_image = step / args.batch
        epoch = COCO_TRAIN_IMAGES * per_image
        text += (f" = {result['seconds'] / step:.1f} train steps of "
                 f"bpt_bilinear_shallow; a COCO epoch at that step time "
                 f"({COCO_TRAIN_IMAGES:,} images) is {epoch / 3600:.1f} h, "
                 f"so whitening is {result['seconds'] / epoch:.2e} of one "
                 f"epoch and {result['seconds'] / (12 * epoch):.2e} of a "
                 f"12-epoch schedule")
    return text


def _same_weight_backbones(kwargs_by_name: Dict[str, Dict[str, Any]],
                           args: argparse.Namespace) -> Dict[str, Any]:
    """PromptedViTs built from each entry, all with the first's frozen
    weights (prompts keep their own initialisation)."""
    import torch

    import bpt_mm  # noqa: F401
    from bpt_mm.models import PromptedViT
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    backbones: Dict[str, Any] = {}
    for name, kwargs in kwargs_by_name.items():
        backbone = PromptedViT(**kwargs)
        if backbones:
            backbone.load_state_dict(
                next(iter(backbones.values())).state_dict(), strict=False)
        backbones[name] = backbone
    return backbones


def _alternate(calls: Dict[str, Any], rounds: int) -> Dict[str, float]:
    """Median seconds of each call, the calls run one after the other for
    ``rounds`` rounds after one warm-up round."""
    times: Dict[str, List[float]] = {name: [] for name in calls}
    for round_ in range(rounds + 1):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            if round_:  # the first round warms up
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def interleaved_inference(args: argparse.Namespace) -> Dict[str, float]:
    """Inference seconds of the un-prompted ViT and of each variant.

    All models share the frozen weights and run in this process, one
    forward each in turn (:func:`_alternate`), so process-to-process
    differences on a busy CPU (9% between two identical forwards was seen
    here) cancel out of the ratios.
    """
    import torch
    names = args.variants or [n for n, v in VARIANTS.items()
                              if v.get('prompt')]
    backbones = _same_weight_backbones(
        {'unprompted': dict(arch=args.arch),
         **{n: _backbone_kwargs(n, args) for n in names}}, args)
    x = torch.rand(args.batch, 3, args.infer_size, args.infer_size)

    def forward(backbone):
        backbone.eval()
        return lambda: backbone(x)

    with torch.no_grad():
        return _alternate({n: forward(b) for n, b in backbones.items()},
                          args.steps)


def interleaved_train(args: argparse.Namespace) -> Dict[str, float]:
    """Train-step seconds of full fine-tuning and of each variant, in this
    process, one step each in turn (see :func:`interleaved_inference`);
    the same weights, head shape and input."""
    import torch
    names = [REFERENCE] + [n for n in (args.variants or VARIANTS)
                           if n != REFERENCE]
    backbones = _same_weight_backbones(
        {n: _backbone_kwargs(n, args) for n in names}, args)
    x = torch.rand(args.batch, 3, args.size, args.size)

    def train_step(backbone):
        backbone.train()
        head = torch.nn.Conv2d(backbone.embed_dims, 1, 1)
        params = [p for p in [*backbone.parameters(), *head.parameters()]
                  if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4)

        def step():
            head(backbone(x)[-1]).pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return step

    return _alternate({n: train_step(b) for n, b in backbones.items()},
                      args.steps)


def ratio_table(medians: Dict[str, float], column: str, reference: str,
                label: str) -> str:
    """Markdown: each median and its ratio to ``medians[reference]``, in a
    column headed ``× label``."""
    lines = [f'| variant | {column} | × {label} |', '|---|---:|---:|']
    for name, seconds in medians.items():
        lines.append(f'| {name} | {seconds:.3f} | '
                     f'{seconds / medians[reference]:.3f}× |')
    return '\n'.join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.interleaved_train:
        print(f'ViT-{args.arch}, train {args.size}x{args.size}, batch '
              f'{args.batch}, one process, median of {args.steps} '
              f'alternating rounds\n')
        print(ratio_table(interleaved_train(args), 'train step s', REFERENCE,
                          'full'))
        return 0
    if args.interleaved_inference:
        print(f'ViT-{args.arch}, inference {args.infer_size}x'
              f'{args.infer_size}, batch {args.batch}, one process, '
              f'median of {args.steps} alternating rounds\n')
        print(ratio_table(interleaved_inference(args), 'inference s',
                          'unprompted', 'un-prompted'))
        return 0
    if args.worker == WHITENING:
        print(json.dumps(run_whitening_worker(args)))
        return 0
    if args.worker:
        print(json.dumps(run_worker(args.worker, args)))
        return 0
    names = list(args.variants or VARIANTS) + list(args.config)
    if args.config and REFERENCE not in names:
        names.insert(0, REFERENCE)
    rows = []
    for name in names:
        print(f'[benchmark] {name} ...', file=sys.stderr, flush=True)
        rows.append(measure(name, args))
    rows = with_ratios(rows)
    first = rows[0]
    print(f"ViT-{args.arch}, train {args.size}x{args.size}, inference "
          f"{args.infer_size}x{args.infer_size}, batch {args.batch}, "
          f"{first['device']} ({first['threads']} threads), median of "
          f'{args.steps} after {args.warmup} warm-up\n')
    print(markdown_table(rows))
    whitening = None
    if args.whitening_images:
        whitening = measure(WHITENING, args)
        print(whitening_summary(whitening, rows, args))
    os.makedirs(osp.dirname(osp.abspath(args.out)), exist_ok=True)
    with open(args.out, 'w') as f:
        json.dump(dict(settings=vars(args), rows=rows, whitening=whitening),
                  f, indent=1)
    print(f'\n[benchmark] JSON: {args.out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
