"""Data-driven whitening of a :class:`~bpt_mm.models.PromptedViT` (torch only).

:mod:`bpt_mm.whitening` holds the math; this module runs it on a backbone:

* :func:`collect_whitening` feeds image batches through the ViT, accumulates
  the projected tokens ``X~`` entering every prompted block whose prompt
  needs whitening, and turns them into ZCA matrices ``W``; across
  ``torch.distributed`` processes the statistics are summed and ``W`` is
  computed on rank 0 and broadcast, so every rank holds the same bits.
* :func:`apply_whitening` writes results into the prompts (``W`` into a
  :class:`~bpt_mm.models.WhitenedPrompt`, ``B = W C`` into a
  whitening-initialised :class:`~bpt_mm.models.BilinearPrompt`).
* :func:`collect_prototypes`: the same image pass for SPT prompts, whose
  initial values are prototypes of the tokens (:mod:`bpt_mm.prototypes`)
  gathered from every process, computed on rank 0 and broadcast.
* :func:`save_whitening` / :func:`load_whitening`: a small torch file so the
  statistics can be computed once (``tools/compute_whitening.py``) and
  reused.

Deep prompts are whitened *block by block*: the statistics of block ``i``
are taken with the prompts of the earlier blocks already holding their
whitening, i.e. on the tokens block ``i`` sees when training starts. This
costs one partial forward pass over the (cached) images per prompted block.

Nothing here imports mmengine; the hook (``bpt_mm.engine.BPTWhiteningHook``)
and the tool are thin glue around these functions.
"""
import dataclasses
import math
import os
import os.path as osp
import time
import warnings
from typing import (TYPE_CHECKING, Any, Dict, Iterable, Iterator, List,
                    Optional, Sequence, Tuple, Union)

import torch
import torch.distributed as dist
from torch import Tensor

from .prototypes import (TokenReservoir, compute_prototypes,
                         per_rank_capacity)
from .real_tokens import (ImageBatch, as_image_batch, real_patch_mask,
                          real_rows)
from .safe_load import CheckpointError, load_weights_only
from .whitening import (BASIS_MODES, RankDeficientWarning,
                        WhiteningStatistics, condition_number, effective_rank,
                        project_tokens, query_key_product,
                        whitened_bilinear_basis, zca_whitening_matrix)

if TYPE_CHECKING:  # pragma: no cover
    from .models import PromptedViT

__all__ = [
    'block_tokens', 'block_token_rows', 'whitening_blocks',
    'missing_whitening_blocks', 'collect_whitening', 'apply_whitening',
    'save_whitening', 'load_whitening', 'synchronise_errors',
    'format_whitening_table', 'FILE_FORMAT',
    'prototype_blocks', 'missing_prototype_blocks', 'prototype_source',
    'prototype_tokens', 'collect_prototypes', 'format_prototype_table'
]

#: ``format`` entry of a whitening file.
FILE_FORMAT = 'bpt_mm.whitening'
#: ``version`` entry of a whitening file written by this code.
FILE_VERSION = 1
# Relative tolerance on the qkv-weight fingerprint stored in a file: float
# reductions on another device differ by ~1e-15, another checkpoint by far
# more than this.
_FINGERPRINT_RTOL = 1e-4


# ---------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------
def _dist_ready() -> bool:
    return dist.is_available() and dist.is_initialized()


def _comm_device() -> torch.device:
    # NCCL only communicates CUDA tensors; gloo and others take CPU ones.
    if dist.get_backend() == 'nccl':
        return torch.device('cuda', torch.cuda.current_device())
    return torch.device('cpu')


def _module_device(module: torch.nn.Module) -> torch.device:
    for tensor in module.parameters():
        return tensor.device
    return torch.device('cpu')


def whitening_blocks(backbone: 'PromptedViT') -> List[int]:
    """Blocks whose prompt needs data-driven whitening, ascending."""
    return sorted(i for i, p in backbone.prompt_modules().items()
                  if p.needs_whitening)


def missing_whitening_blocks(backbone: 'PromptedViT') -> List[int]:
    """Blocks whose prompt needs whitening and has not got it (this rank)."""
    return [i for i in whitening_blocks(backbone)
            if not backbone.prompt_modules()[i].is_whitened]


def synchronise_errors(error: Optional[BaseException], stage: str,
                       distributed: bool = True) -> None:
    """Make a failure on any rank a failure on every rank.

    Call it on every rank, with the exception this rank caught (or None),
    before a collective that a failed rank would never reach: the ranks
    all-reduce one flag each, and if any is set every rank raises a
    RuntimeError naming the failing ranks and their messages, instead of
    the healthy ranks waiting in the next collective until the process-group
    timeout. Without ``torch.distributed`` (or with ``distributed=False``)
    it re-raises ``error`` itself.

    Args:
        error (BaseException, optional): What this rank caught.
        stage (str): What was being done, for the message.
        distributed (bool): Whether to synchronise. Defaults to True.
    """
    if not (distributed and _dist_ready()):
        if error is not None:
            raise error
        return
    world, rank = dist.get_world_size(), dist.get_rank()
    flags = torch.zeros(world, dtype=torch.int64, device=_comm_device())
    flags[rank] = int(error is not None)
    dist.all_reduce(flags, op=dist.ReduceOp.SUM)
    failed = [r for r in range(world) if int(flags[r])]
    if not failed:
        return
    # Everyone knows there was a failure, so everyone enters this one too.
    messages: List[Optional[str]] = [None] * world
    mine = None if error is None else f'{type(error).__name__}: {error}'
    dist.all_gather_object(messages, mine)
    detail = '; '.join(f'rank {r}: {messages[r]}' for r in failed)
    raise RuntimeError(f'whitening failed on rank(s) {failed} while {stage}'
                       f' (every rank stops): {detail}') from error


def _check_positive_int(value: Any, arg: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f'`{arg}` must be a positive int, got {value!r}')
    return value


def _limited_images(batches: Iterable[Union[Tensor, ImageBatch]],
                    num_images: int, device: torch.device,
                    cache: Optional[List[ImageBatch]]
                    ) -> Iterator[ImageBatch]:
    """The first ``num_images`` images of ``batches`` (the last batch cut).

    A batch is a ``(B, C, H, W)`` tensor (every pixel is image) or an
    :class:`~bpt_mm.real_tokens.ImageBatch` that also gives each image's
    real size. No batch is drawn once the count is reached, so a data loader
    loads no more than needed. Batches are appended to ``cache`` when it is
    a list.
    """
    seen = 0
    for batch in batches:
        batch = as_image_batch(batch)
        part = batch.first(num_images - seen).to(device)
        if cache is not None:
            cache.append(part)
        seen += part.images.shape[0]
        yield part
        if seen >= num_images:
            return


def block_tokens(backbone: 'PromptedViT', x: Tensor, blocks: Sequence[int],
                 statistics: Optional[WhiteningStatistics] = None
                 ) -> Dict[int, Tensor]:
    """The tokens the whitening statistic of each of ``blocks`` is made of.

    Runs ``x`` through the backbone up to the highest of ``blocks`` (not
    beyond) and selects, per block, the tokens entering it as
    ``statistics`` says: patches only or CLS + patches (``tokens``; never
    prompts), before or after the block's ``norm1`` (``source``). These are
    the rows ``X`` that :func:`~bpt_mm.whitening.project_tokens` maps to
    ``X~^T``. Gradients follow the caller's grad mode and the backbone's
    own rules; the statistics run under ``torch.no_grad()``.

    Args:
        backbone (PromptedViT): The backbone.
        x (Tensor): Preprocessed images ``(B, C, H, W)``.
        blocks (Sequence[int]): Block indices in ``[0, num_layers)``.
        statistics (WhiteningStatistics, optional): Token selection;
            default the paper's (patches entering the block).

    Returns:
        dict[int, Tensor]: ``(B, n, d)`` tokens per block.
    """
    statistics = WhiteningStatistics() if statistics is None else statistics
    wanted = sorted(set(blocks))
    if not wanted:
        return {}
    bad = [i for i in wanted if isinstance(i, bool) or not isinstance(i, int)
           or not 0 <= i < backbone.num_layers]
    if bad:
        raise ValueError(f'blocks {bad} are not block indices of this '
                         f'{backbone.num_layers}-block backbone (allowed: '
                         f'0 to {backbone.num_layers - 1})')
    num_cls = backbone.num_prefix_tokens
    start = backbone.num_sequence_prefix_tokens
    out: Dict[int, Tensor] = {}
    steps = backbone.iter_blocks(x)
    try:
        for index, tokens_in, _, _ in steps:
            if index in wanted:
                # [CLS, shallow prompts, patches]: prompts never count.
                tokens = tokens_in[:, start:]
                if statistics.tokens == 'all' and num_cls:
                    tokens = torch.cat([tokens_in[:, :num_cls], tokens],
                                       dim=1)
                if statistics.source == 'norm1':
                    # per token: selecting first is exact
                    tokens = backbone.blocks[index].norm1(tokens)
                out[index] = tokens
            if index == wanted[-1]:
                break
    finally:
        steps.close()  # do not run the blocks above
    return out


def _patch_mask(backbone: 'PromptedViT', batch: ImageBatch) -> Tensor:
    """:func:`~bpt_mm.real_tokens.real_patch_mask` on the backbone's grid
    (it pads the images to a multiple of the patch size)."""
    p = backbone.patch_size
    height, width = batch.images.shape[-2:]
    return real_patch_mask(batch.img_shapes, (-(-height // p), -(-width // p)),
                           p, batch.images.shape[0],
                           device=batch.images.device)


def block_token_rows(backbone: 'PromptedViT', batch: Union[Tensor,
                                                           ImageBatch],
                     blocks: Sequence[int],
                     statistics: Optional[WhiteningStatistics] = None
                     ) -> Tuple[Dict[int, Tensor], int]:
    """The real tokens of :func:`block_tokens` as rows, padding dropped.

    Patches that cover only padding (see :mod:`bpt_mm.real_tokens`: a patch
    is kept when it overlaps its image's ``img_shape``) are left out; the
    class token (``statistics.tokens == 'all'``) is always kept.

    Args:
        backbone (PromptedViT): The backbone.
        batch (Tensor | ImageBatch): Images, with their real sizes when
            padded.
        blocks (Sequence[int]): Block indices.
        statistics (WhiteningStatistics, optional): Token selection.

    Returns:
        tuple[dict[int, Tensor], int]: ``(N, d)`` rows per block, and the
        number of tokens dropped per block (the same for every block).
    """
    statistics = WhiteningStatistics() if statistics is None else statistics
    batch = as_image_batch(batch)
    tokens = block_tokens(backbone, batch.images, blocks, statistics)
    mask = _patch_mask(backbone, batch)
    leading = backbone.num_prefix_tokens if statistics.tokens == 'all' \
        else 0
    rows = {i: real_rows(t, mask, leading) for i, t in tokens.items()}
    return rows, int(mask.numel() - mask.sum())


def _chosen_blocks(needing: List[int], blocks: Optional[Sequence[int]],
                   what: str) -> List[int]:
    """``blocks`` (default: all of ``needing``), sorted, each checked to be
    one of ``needing``; the error names the others and ``what`` they lack.
    """
    if blocks is None:
        return list(needing)
    blocks = sorted(set(blocks))
    wrong = [i for i in blocks if i not in needing]
    if wrong:
        raise ValueError(f'`blocks` {wrong} have no {what}; those that do: '
                         f'{needing}')
    return blocks


def _block_statistics(backbone: 'PromptedViT', images: Iterable[ImageBatch],
                      block: int, statistics: WhiteningStatistics,
                      device: torch.device):
    """Accumulate ``X~`` of the real tokens entering ``block`` over
    ``images``; returns the accumulator, the image count and the number of
    padding tokens dropped."""
    blk = backbone.blocks[block]
    # M in float64 (from float64 weights): it multiplies every token.
    product = query_key_product(blk.attn.qkv.weight.detach().to(
        torch.float64), order=statistics.product)
    acc = statistics.make_accumulator(backbone.embed_dims,
                                      name=f'block {block}', device=device)
    num_images = dropped = 0
    for batch in images:
        if statistics.statistic == 'authors':
            # Their per-position image average needs every position of
            # every image: padding patches stay in, and the user is told.
            tokens = block_tokens(backbone, batch.images, [block],
                                  statistics)[block]
            padding = int((~_patch_mask(backbone, batch)).sum())
            if padding:
                warnings.warn(
                    f'block {block}: statistic=\'authors\' averages '
                    f'every token position over the images, so the '
                    f'{padding} padding patch tokens of this batch are in '
                    f"it; use statistic='paper' to leave them out")
            acc.update(project_tokens(tokens, product))
        else:
            rows, padding = block_token_rows(backbone, batch, [block],
                                             statistics)
            dropped += padding
            acc.update(project_tokens(rows[block], product))
        num_images += batch.images.shape[0]
    return acc, num_images, dropped


def _warn_if_rank_deficient(result: Dict[str, Any], block: int, dim: int,
                            eps: float) -> None:
    """Record ``Sigma``'s effective rank in ``result``; warn when it is
    below half of ``d`` (same on every rank: ``Sigma`` is rank 0's)."""
    rank = effective_rank(result['sigma'], eps)
    result['effective_rank'] = rank
    if rank < dim / 2:
        warnings.warn(
            f'whitening block {block}: Sigma has effective rank {rank} of '
            f'd={dim} ({result["num_images"]} images): the images vary too '
            f'little (uniform or near-identical images?), so in {dim - rank} '
            f'directions W is set by eps alone, not by the data; check the '
            f'training images the whitening reads', RankDeficientWarning,
            stacklevel=3)


def _solve_block(acc, statistics: WhiteningStatistics,
                 prompt: torch.nn.Module, block: int, bilinear_mode: str,
                 seed: int) -> Dict[str, Any]:
    """``Sigma``, ``W`` (and ``B``) of one block, on the CPU in float64."""
    sigma = acc.second_moment(center=statistics.center).cpu()
    whitening = zca_whitening_matrix(sigma, eps=statistics.eps)
    out = {
        'whitening': whitening,
        'sigma': sigma,
        'condition_number': condition_number(sigma, statistics.eps),
    }
    if prompt.basis_rank is not None:
        out['basis'] = _bilinear_basis(whitening, sigma, prompt, block,
                                       bilinear_mode, seed)
    return out


def _bilinear_basis(whitening: Tensor, sigma: Optional[Tensor],
                    prompt: torch.nn.Module, block: int, mode: str,
                    seed: int) -> Tensor:
    # From the float32 W that is stored, on the CPU, with a generator seeded
    # per block: a file gives back the same B bit for bit.
    generator = torch.Generator().manual_seed(seed + block)
    return whitened_bilinear_basis(whitening.cpu(), prompt.basis_rank, mode,
                                   sigma=sigma, generator=generator)


def _broadcast_block(solved: Optional[Dict[str, Any]], dim: int,
                     rank_p: Optional[int]) -> Dict[str, Any]:
    """Broadcast rank 0's ``solved`` in one float64 buffer."""
    numel = 2 * dim * dim + 1 + (dim * rank_p if rank_p else 0)
    device = _comm_device()
    if dist.get_rank() == 0:
        parts = [solved['sigma'].reshape(-1),
                 solved['whitening'].to(torch.float64).reshape(-1),
                 torch.tensor([solved['condition_number']],
                              dtype=torch.float64)]
        if rank_p:
            parts.append(solved['basis'].to(torch.float64).reshape(-1))
        flat = torch.cat(parts).to(device)
    else:
        flat = torch.empty(numel, dtype=torch.float64, device=device)
    dist.broadcast(flat, src=0)
    flat = flat.cpu()
    d2 = dim * dim
    # float32 -> float64 -> float32 is exact: every rank gets rank 0's bits.
    out = {
        'sigma': flat[:d2].reshape(dim, dim).clone(),
        'whitening': flat[d2:2 * d2].reshape(dim, dim).to(torch.float32),
        'condition_number': float(flat[2 * d2]),
    }
    if rank_p:
        out['basis'] = flat[2 * d2 + 1:].reshape(dim, rank_p).to(
            torch.float32)
    return out


# ---------------------------------------------------------------------------
# Collection
# ---------------------------------------------------------------------------
def collect_whitening(backbone: 'PromptedViT',
                      batches: Iterable[Tensor],
                      statistics: Optional[WhiteningStatistics] = None,
                      num_images: int = 100,
                      distributed: bool = True,
                      blocks: Optional[Sequence[int]] = None,
                      bilinear_mode: str = 'random',
                      seed: int = 0,
                      allow_few_tokens: bool = True
                      ) -> Dict[int, Dict[str, Any]]:
    """Compute (and write) the whitening of every prompt that needs it.

    For each block ``i`` whose prompt needs whitening (ascending), the first
    ``num_images`` images of ``batches`` are run through the backbone up to
    block ``i`` (eval mode, no grad), the tokens entering block ``i`` are
    selected (``statistics.tokens``: patches, or CLS + patches; never
    prompts; never patches of padding), taken before or after ``norm1``
    (``statistics.source``), projected with the block's query-key product
    (``statistics.product``) and accumulated in float64. ``W = zca(Sigma)``
    is then written into the prompt before block ``i + 1`` is collected, so
    a deep prompt's statistics see the earlier prompts as training will
    (shallow prompts enter before block 0, so block 0's patch tokens never
    depend on them).

    With ``torch.distributed`` initialised and ``distributed=True`` each
    process passes its own images (``num_images`` counts per process); the
    sums are all-reduced, rank 0 computes ``W`` (and ``B``) and broadcasts
    them, so every rank holds bit-identical results. A failure on any rank
    (bad data, non-finite features, a singular statistic) raises a
    RuntimeError naming the failing rank(s) on every rank.

    Args:
        backbone (PromptedViT): The backbone; its prompts are modified.
        batches (Iterable[Tensor | ImageBatch]): Preprocessed image
            batches ``(B, C, H, W)``, or :class:`~bpt_mm.real_tokens.
            ImageBatch` with each image's real size: then patches that
            cover only padding are left out of the statistic (see
            :mod:`bpt_mm.real_tokens`); consumed once (images are cached on
            the backbone's device when more than one block needs them).
        statistics (WhiteningStatistics, optional): Options; default the
            paper's.
        num_images (int): Images to use (per process). Defaults to 100.
        distributed (bool): Reduce over ``torch.distributed`` processes when
            it is initialised. Defaults to True.
        blocks (Sequence[int], optional): Only these blocks (each must need
            whitening); default every block that needs it.
        bilinear_mode (str): ``C`` of ``B = W C`` for whitening-initialised
            bilinear prompts: ``'random'``, ``'eigen'`` or ``'identity'``
            (see :func:`~bpt_mm.whitening.whitened_bilinear_basis`).
        seed (int): Seed of the random ``C``; block ``i`` uses
            ``seed + i``.
        allow_few_tokens (bool): With False, the paper's statistic over
            fewer tokens (all processes together) than channels is refused
            with a ValueError naming the block and the counts, on every
            rank alike. Defaults to True (a FewTokensWarning), for timing
            and experiments; the hook and ``tools/compute_whitening.py``
            refuse unless told otherwise.

    Returns:
        dict[int, dict]: Per block: ``whitening`` (``W``, float32 CPU),
        ``sigma`` (float64 CPU), ``basis`` (bilinear prompts only),
        ``num_tokens`` (the tokens in ``Sigma``), ``num_dropped_tokens``
        (padding patches left out), ``num_images`` (all processes),
        ``condition_number`` and ``seconds`` (this process's wall time).
    """
    statistics = WhiteningStatistics() if statistics is None else statistics
    if not isinstance(statistics, WhiteningStatistics):
        raise ValueError('`statistics` must be a WhiteningStatistics, got '
                         f'{type(statistics).__name__}')
    _check_positive_int(num_images, 'num_images')
    if bilinear_mode not in BASIS_MODES:
        raise ValueError(f'`bilinear_mode` must be one of {BASIS_MODES}, got '
                         f'{bilinear_mode!r}')
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f'`seed` must be an int, got {seed!r}')
    blocks = _chosen_blocks(whitening_blocks(backbone), blocks,
                            'prompt that needs whitening')
    if not blocks:
        return {}

    use_dist = distributed and _dist_ready()
    prompts = backbone.prompt_modules()
    dim = backbone.embed_dims
    device = _module_device(backbone)
    was_training = backbone.training
    cache: Optional[List[ImageBatch]] = [] if len(blocks) > 1 else None
    results: Dict[int, Dict[str, Any]] = {}
    backbone.eval()
    try:
        with torch.no_grad():
            for position, block in enumerate(blocks):
                start = time.perf_counter()
                prompt = prompts[block]
                error = acc = None
                try:
                    images = _limited_images(batches, num_images, device,
                                             cache) if position == 0 \
                        else cache
                    acc, n_img, n_dropped = _block_statistics(
                        backbone, images, block, statistics, device)
                except Exception as exc:  # noqa: BLE001 (re-raised below)
                    error = exc
                stage = f'collecting the statistics of block {block}'
                synchronise_errors(error, stage, use_dist)
                if use_dist:
                    count = torch.tensor([n_img, n_dropped],
                                         dtype=torch.int64,
                                         device=_comm_device())
                    dist.all_reduce(count, op=dist.ReduceOp.SUM)
                    n_img, n_dropped = (int(c) for c in count.tolist())
                    acc.all_reduce()
                if not allow_few_tokens and statistics.statistic == 'paper' \
                        and acc.num_tokens < dim:
                    # Same counts on every rank after the reduction, so every
                    # rank raises here and none waits in a collective.
                    raise ValueError(
                        f'whitening block {block}: only {acc.num_tokens} '
                        f'tokens from {n_img} images for d={dim} channels; '
                        f'the statistic needs at least {dim} tokens (the '
                        f'paper uses N >> d), so use more images '
                        f'(`num_images`) or set allow_few_tokens=True')
                solved = None
                if not use_dist or dist.get_rank() == 0:
                    try:
                        solved = _solve_block(acc, statistics, prompt, block,
                                              bilinear_mode, seed)
                    except Exception as exc:  # noqa: BLE001
                        error = exc
                synchronise_errors(error, f'whitening block {block}',
                                   use_dist)
                if use_dist:
                    solved = _broadcast_block(solved, dim,
                                              prompt.basis_rank)
                result = dict(solved, num_tokens=acc.num_tokens,
                              num_dropped_tokens=n_dropped,
                              num_images=n_img)
                _warn_if_rank_deficient(result, block, dim, statistics.eps)
                # Written now: the next block's tokens must see it.
                prompt.apply_whitening(result)
                result['seconds'] = time.perf_counter() - start
                results[block] = result
    finally:
        backbone.train(was_training)
    return results


# ---------------------------------------------------------------------------
# SPT prototypes: the same image pass, another per-block result
# ---------------------------------------------------------------------------
def prototype_blocks(backbone: 'PromptedViT') -> List[int]:
    """Blocks whose prompt is initialised from prototypes (SPT), ascending."""
    return sorted(i for i, p in backbone.prompt_modules().items()
                  if p.needs_prototypes)


def missing_prototype_blocks(backbone: 'PromptedViT') -> List[int]:
    """Blocks whose SPT prompt has not got its prototypes (this rank)."""
    prompts = backbone.prompt_modules()
    return [i for i in prototype_blocks(backbone)
            if not bool(prompts[i].prototypes_ready)]


def prototype_source(backbone: 'PromptedViT', block: int) -> str:
    """The token source of block ``block``'s SPT prompt: its ``source``, or
    by depth as the authors (shallow: the patch embedding; deep: the
    block's input)."""
    source = backbone.prompt_modules()[block].source
    if source is None:
        deep = backbone.prompt_cfg['depth'] == 'deep'
        source = 'block_input' if deep else 'patch_embed'
    return source


def prototype_tokens(backbone: 'PromptedViT', x: Tensor, block: int,
                     source: str) -> Tensor:
    """The patch tokens SPT prototypes of ``block`` are drawn from.

    ``'block_input'``: the patch tokens entering the block
    (:func:`block_tokens`, never CLS or prompts). ``'patch_embed'``: the
    patch embedding of the (padded) images before the position embedding,
    read from the ``patch_embed`` module's output while the backbone embeds
    ``x``.

    Returns:
        Tensor: ``(B, n, d)``.
    """
    if source == 'block_input':
        return block_tokens(backbone, x, [block])[block]
    if source != 'patch_embed':
        raise ValueError(f"prototype `source` must be 'patch_embed' or "
                         f"'block_input', got {source!r}")
    seen: List[Tensor] = []
    handle = backbone.patch_embed.register_forward_hook(
        lambda module, args, out: seen.append(out))
    try:
        backbone._embed(x)
    finally:
        handle.remove()
    return seen[0].flatten(2).transpose(1, 2)  # (B, d, h, w) -> (B, hw, d)


def _gather_rows(rows: Tensor) -> Tensor:
    """Every rank's ``rows`` (``(n_r, d)``, n_r may differ), concatenated in
    rank order, on every rank."""
    device = _comm_device()
    world = dist.get_world_size()
    count = torch.tensor([rows.shape[0]], dtype=torch.int64, device=device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    counts = [int(c.item()) for c in counts]
    padded = torch.zeros(max(counts), rows.shape[1], dtype=rows.dtype,
                         device=device)
    padded[:rows.shape[0]] = rows.to(device)
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n].cpu() for p, n in zip(parts, counts)])


def collect_prototypes(backbone: 'PromptedViT',
                       batches: Iterable[Union[Tensor, ImageBatch]],
                       num_images: int = 100,
                       distributed: bool = True,
                       blocks: Optional[Sequence[int]] = None,
                       seed: int = 0,
                       max_tokens: int = 20000,
                       kmeans_iters: int = 50
                       ) -> Dict[int, Dict[str, Any]]:
    """Compute (and write) the prototypes of every SPT prompt.

    The image pass is :func:`collect_whitening`'s: the first ``num_images``
    images of ``batches`` per process (cached when several blocks need
    them), eval mode, no grad, blocks in ascending order, each block's
    result written before the next block is collected (a deep prompt's
    tokens see the earlier prototypes as training will), and a failure on
    any rank raised on every rank. Per block the tokens of
    :func:`prototype_tokens` go into a :class:`~bpt_mm.prototypes.
    TokenReservoir` of at most ``max_tokens`` rows over all processes
    (``ceil(max_tokens / world_size)`` per process); the reservoirs are
    gathered, rank 0 computes the prompt's ``init`` with
    :func:`~bpt_mm.prototypes.compute_prototypes` seeded ``seed + block``,
    and broadcasts the result, so every rank holds the same bits. While no
    reservoir overflows, the result does not depend on how the images were
    split over processes or ordered.

    Args:
        backbone (PromptedViT): The backbone; its SPT prompts are modified.
        batches (Iterable[Tensor | ImageBatch]): Preprocessed image
            batches ``(B, C, H, W)``, with each image's real size when
            padded (padding patches are left out); consumed once.
        num_images (int): Images to use (per process). Defaults to 100.
        distributed (bool): Gather over ``torch.distributed`` processes
            when it is initialised. Defaults to True.
        blocks (Sequence[int], optional): Only these blocks (each must have
            an SPT prompt); default every such block.
        seed (int): Seed of the reservoirs and of the prototype draws;
            block ``i`` uses ``seed + i``.
        max_tokens (int): Most token rows kept per block, over all
            processes. Defaults to 20000 (61 MB at d = 768).
        kmeans_iters (int): Most Lloyd iterations of ``init='kmeans'``.

    Returns:
        dict[int, dict]: Per block: ``prototypes`` (float32 CPU, m x d),
        ``init``, ``source``, ``num_images`` and ``num_tokens`` (all
        processes), ``num_kept`` (rows the prototypes were computed from)
        and ``seconds`` (this process's wall time).
    """
    _check_positive_int(num_images, 'num_images')
    _check_positive_int(max_tokens, 'max_tokens')
    _check_positive_int(kmeans_iters, 'kmeans_iters')
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f'`seed` must be an int, got {seed!r}')
    blocks = _chosen_blocks(prototype_blocks(backbone), blocks,
                            'SPT prompt')
    if not blocks:
        return {}

    use_dist = distributed and _dist_ready()
    world = dist.get_world_size() if use_dist else 1
    capacity = per_rank_capacity(max_tokens, world)
    prompts = backbone.prompt_modules()
    dim = backbone.embed_dims
    device = _module_device(backbone)
    was_training = backbone.training
    cache: Optional[List[ImageBatch]] = [] if len(blocks) > 1 else None
    results: Dict[int, Dict[str, Any]] = {}
    backbone.eval()
    try:
        with torch.no_grad():
            for position, block in enumerate(blocks):
                start = time.perf_counter()
                prompt = prompts[block]
                source = prototype_source(backbone, block)
                reservoir = TokenReservoir(capacity, dim, seed=seed + block,
                                           name=f'block {block}')
                error, n_img = None, 0
                try:
                    images = _limited_images(batches, num_images, device,
                                             cache) if position == 0 \
                        else cache
                    for batch in images:
                        # Only real image tokens: padding patches would
                        # become prototypes (see bpt_mm.real_tokens).
                        tokens = prototype_tokens(backbone, batch.images,
                                                  block, source)
                        reservoir.update(real_rows(
                            tokens, _patch_mask(backbone, batch)))
                        n_img += batch.images.shape[0]
                except Exception as exc:  # noqa: BLE001 (re-raised below)
                    error = exc
                synchronise_errors(
                    error, f'collecting the SPT tokens of block {block}',
                    use_dist)
                rows, n_tok = reservoir.rows, reservoir.num_seen
                if use_dist:
                    counts = torch.tensor([n_img, n_tok], dtype=torch.int64,
                                          device=_comm_device())
                    dist.all_reduce(counts, op=dist.ReduceOp.SUM)
                    n_img, n_tok = (int(c) for c in counts.tolist())
                    rows = _gather_rows(rows)
                solved = None
                if not use_dist or dist.get_rank() == 0:
                    try:
                        if rows.shape[0] < prompt.num_tokens:
                            raise ValueError(
                                f'block {block}: {prompt.num_tokens} SPT '
                                f'prototypes need at least as many tokens; '
                                f'{n_tok} were seen in {n_img} images and '
                                f'{rows.shape[0]} kept. Use more images '
                                '(`num_images`), a larger `prototype_tokens`'
                                ' or fewer prompts (`prompt.num_tokens`)')
                        solved = compute_prototypes(
                            rows, prompt.num_tokens, prompt.init,
                            seed=seed + block, kmeans_iters=kmeans_iters,
                            name=f'block {block}')
                    except Exception as exc:  # noqa: BLE001
                        error = exc
                synchronise_errors(
                    error, f'computing the SPT prototypes of block {block} '
                    f'({n_img} images, {rows.shape[0]} tokens kept)',
                    use_dist)
                if use_dist:
                    if solved is None:
                        solved = torch.empty(prompt.num_tokens, dim)
                    solved = solved.to(_comm_device())
                    dist.broadcast(solved, src=0)
                    solved = solved.cpu()
                target = prompt.tokens
                # Written now: the next block's tokens must see it.
                prompt.set_prototypes(solved.to(device=target.device,
                                                dtype=target.dtype))
                results[block] = dict(
                    prototypes=solved, init=prompt.init, source=source,
                    num_images=n_img, num_tokens=n_tok,
                    num_kept=int(rows.shape[0]),
                    seconds=time.perf_counter() - start)
    finally:
        backbone.train(was_training)
    return results


def format_prototype_table(results: Dict[int, Dict[str, Any]]) -> str:
    """One line per block: init, source, images, tokens seen and kept,
    seconds."""
    lines = [f"{'block':>5} {'init':>9} {'source':>11} {'images':>7} "
             f"{'tokens':>9} {'kept':>7} {'seconds':>8}"]
    for block in sorted(results):
        r = results[block]
        lines.append(f"{block:>5} {r['init']:>9} {r['source']:>11} "
                     f"{r['num_images']:>7} {r['num_tokens']:>9} "
                     f"{r['num_kept']:>7} {r['seconds']:>8.2f}")
    return '\n'.join(lines)


def apply_whitening(backbone: 'PromptedViT',
                    results: Dict[int, Dict[str, Any]],
                    bilinear_mode: str = 'random',
                    seed: int = 0) -> List[int]:
    """Write whitening results (e.g. from :func:`load_whitening`) into prompts.

    ``W`` goes into a WhitenedPrompt; a whitening-initialised
    BilinearPrompt gets ``B = W C`` (``results[i]['basis']`` when present,
    else built from ``W`` with ``bilinear_mode`` and the generator seeded
    ``seed + i``, as :func:`collect_whitening` does), in the module's dtype
    and device. :func:`collect_whitening` already writes its results; this is
    for results loaded from a file.

    Returns:
        list[int]: The blocks written.
    """
    if bilinear_mode not in BASIS_MODES:
        raise ValueError(f'`bilinear_mode` must be one of {BASIS_MODES}, got '
                         f'{bilinear_mode!r}')
    prompts = backbone.prompt_modules()
    needing = whitening_blocks(backbone)
    wrong = sorted(set(results) - set(needing))
    if wrong:
        raise ValueError(f'whitening results for blocks {wrong}, which have '
                         f'no prompt that needs whitening ({needing} do)')
    for block in sorted(results):
        prompt, result = prompts[block], dict(results[block])
        if prompt.basis_rank is not None and 'basis' not in result:
            result['basis'] = _bilinear_basis(result['whitening'],
                                              result.get('sigma'), prompt,
                                              block, bilinear_mode, seed)
        prompt.apply_whitening(result)
    return sorted(results)


# ---------------------------------------------------------------------------
# File
# ---------------------------------------------------------------------------
def _fingerprint(backbone: 'PromptedViT', block: int) -> float:
    weight = backbone.blocks[block].attn.qkv.weight.detach()
    return float(weight.to(torch.float64).norm())


def save_whitening(path: Union[str, os.PathLike],
                   results: Dict[int, Dict[str, Any]],
                   backbone: 'PromptedViT',
                   statistics: WhiteningStatistics) -> None:
    """Save :func:`collect_whitening` results as a torch file.

    The file holds tensors and plain types only (it loads with
    ``weights_only=True``): ``format``, ``version``, ``embed_dims``,
    ``num_layers``, ``num_heads``, ``patch_size``, ``prompt_type``,
    ``prompt_depth``, ``layers`` (the blocks it has), ``statistics`` (the
    options as a dict), ``num_images`` and ``blocks`` = {block: dict(
    whitening, sigma, num_tokens, num_images, condition_number,
    qkv_fingerprint)}. The fingerprint (the norm of the block's
    ``qkv.weight``) lets :func:`load_whitening` refuse a file computed for
    other backbone weights. Written atomically (temporary file + rename).
    """
    if not results:
        raise ValueError('no whitening results to save')
    if not isinstance(statistics, WhiteningStatistics):
        raise ValueError('`statistics` must be a WhiteningStatistics, got '
                         f'{type(statistics).__name__}')
    cfg = backbone.prompt_cfg or {}
    blocks = {}
    for block in sorted(results):
        result = results[block]
        entry = {
            'whitening': result['whitening'].detach().cpu().to(
                torch.float32).contiguous(),
            'num_tokens': int(result['num_tokens']),
            'num_dropped_tokens': int(result.get('num_dropped_tokens', 0)),
            'num_images': int(result['num_images']),
            'condition_number': float(result['condition_number']),
            'qkv_fingerprint': _fingerprint(backbone, block),
        }
        if result.get('sigma') is not None:
            entry['sigma'] = result['sigma'].detach().cpu().to(
                torch.float64).contiguous()
        blocks[int(block)] = entry
    payload = {
        'format': FILE_FORMAT,
        'version': FILE_VERSION,
        'embed_dims': int(backbone.embed_dims),
        'num_layers': int(backbone.num_layers),
        'num_heads': int(backbone.num_heads),
        'patch_size': int(backbone.patch_size),
        'prompt_type': cfg.get('type'),
        'prompt_depth': cfg.get('depth'),
        'layers': sorted(blocks),
        'statistics': dataclasses.asdict(statistics),
        'num_images': max(b['num_images'] for b in blocks.values()),
        'blocks': blocks,
    }
    path = os.fspath(path)
    parent = osp.dirname(osp.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = f'{path}.tmp{os.getpid()}'
    torch.save(payload, tmp)
    os.replace(tmp, path)


def _refuse(path: str, why: str) -> ValueError:
    return ValueError(f'whitening file {path!r} does not fit this model: '
                      f'{why}')


def _typed_field(path: str, key: str, value: Any,
                 types: Union[type, Tuple[type, ...]]) -> Any:
    """``value`` if it is of ``types`` (never a bool, never a tensor), else
    a ValueError naming the file and the key."""
    if isinstance(value, types) and not isinstance(value, bool):
        return value
    names = ' or '.join(t.__name__ for t in (
        types if isinstance(types, tuple) else (types, )))
    shown = (f'a {value.dtype} tensor' if isinstance(value, Tensor)
             else f'{value!r} ({type(value).__name__})')
    raise ValueError(f'whitening file {path!r}: `{key}` must be {names}, got '
                     f'{shown[:200]}')


def _check_zca(path: str, block: int, matrix: Tensor) -> None:
    """Refuse a whitening matrix that no ZCA whitening gives.

    :func:`~bpt_mm.whitening.zca_whitening_matrix` writes
    ``U diag((S + reg)^{-1/2}) U^T``: exactly symmetric and positive
    definite. A zero, singular, indefinite or non-symmetric matrix (a
    damaged or hand-made file) would otherwise become the prompts'
    projection without any error (all prompts collapsed onto a subspace,
    or flipped).
    """
    w = matrix.detach().to(torch.float64)
    scale = float(w.abs().max())
    if scale == 0.0:
        raise _refuse(path, f'block {block}: the whitening matrix is all '
                      'zeros; a ZCA whitening matrix is positive definite')
    asym = float((w - w.T).abs().max()) / scale
    if asym > 1e-5:
        raise _refuse(path, f'block {block}: the whitening matrix is not '
                      f'symmetric (largest |W - W^T| is {asym:.3g} of its '
                      f'largest entry); tools/compute_whitening.py writes '
                      f'the symmetric ZCA matrix')
    smallest = float(torch.linalg.eigvalsh((w + w.T) / 2)[0])
    if not smallest > 0.0:
        raise _refuse(path, f'block {block}: the whitening matrix is not '
                      f'positive definite (smallest eigenvalue '
                      f'{smallest:.3g}); a ZCA whitening matrix is')


def _real_matrix(path: str, block: int, name: str, value: Any,
                 dim: int) -> Tensor:
    """``blocks[block][name]`` if it is a dense, real floating (dim, dim)
    tensor, else a ValueError naming the file and the key (a complex matrix
    is refused, never cast)."""
    key = f'blocks[{block}].{name}'
    if not isinstance(value, Tensor):
        raise ValueError(f'whitening file {path!r}: `{key}` must be a '
                         f'({dim}, {dim}) tensor, got {type(value).__name__}')
    if value.layout != torch.strided or not value.dtype.is_floating_point:
        raise ValueError(f'whitening file {path!r}: `{key}` must be a dense '
                         f'real floating-point tensor, got a {value.dtype} '
                         f'{value.layout} tensor')
    if tuple(value.shape) != (dim, dim):
        raise _refuse(path, f'block {block}: `{key}` must be ({dim}, {dim}), '
                      f'got {tuple(value.shape)}')
    return value


def load_whitening(path: Union[str, os.PathLike],
                   backbone: 'PromptedViT',
                   return_info: bool = False,
                   check_weights: bool = True
                   ) -> Union[Dict[int, Dict[str, Any]],
                              Tuple[Dict[int, Dict[str, Any]],
                                    Dict[str, Any]]]:
    """Read a :func:`save_whitening` file for ``backbone``.

    Refuses (ValueError naming the file and the mismatch) a file that is not
    a whitening file, or is for another ``embed_dims``, ``num_layers`` or
    ``patch_size``, lacks a block whose prompt needs whitening, holds a
    matrix that is not ``(d, d)`` and finite, or (with ``check_weights``)
    was computed with other ``qkv`` weights.

    Args:
        path (str | PathLike): The file.
        backbone (PromptedViT): The model it is for.
        return_info (bool): Also return the file's header (everything but
            ``blocks``). Defaults to False.
        check_weights (bool): Compare the stored qkv-weight fingerprints.
            Defaults to True.

    Returns:
        dict[int, dict] | tuple[dict, dict]: Results for the blocks of
        ``backbone`` that need whitening, in :func:`collect_whitening`'s
        format (without ``seconds``), ready for :func:`apply_whitening`;
        and the header when ``return_info``.
    """
    path = os.fspath(path)
    if not osp.isfile(path):
        raise FileNotFoundError(f'whitening file {path!r} does not exist')
    try:
        payload = load_weights_only(path, what='whitening file')
    except CheckpointError as exc:
        raise ValueError(f'{path!r} is not a readable whitening file: '
                         f'{exc}') from exc
    if not isinstance(payload, dict) or payload.get('format') != FILE_FORMAT:
        raise ValueError(f'{path!r} is not a bpt_mm whitening file (no '
                         f"format={FILE_FORMAT!r}); write one with "
                         'tools/compute_whitening.py')
    version = _typed_field(path, 'version', payload.get('version'), int)
    if version > FILE_VERSION:
        raise ValueError(f'{path!r} has format version {version}; this '
                         f'bpt_mm reads up to {FILE_VERSION}')
    for key, have in (('embed_dims', backbone.embed_dims),
                      ('num_layers', backbone.num_layers),
                      ('patch_size', backbone.patch_size)):
        stored_value = _typed_field(path, key, payload.get(key), int)
        if stored_value != have:
            raise _refuse(path, f'it is for {key}={stored_value}, the '
                          f'model has {key}={have}')
    stored = payload.get('blocks')
    if not isinstance(stored, dict):
        raise ValueError(f'{path!r} has no `blocks` dict')
    needing = whitening_blocks(backbone)
    missing = [i for i in needing if i not in stored]
    if missing:
        raise _refuse(path, f'it has whitening for blocks {sorted(stored)} '
                      f'(layers {payload.get("layers")}), but the prompts of '
                      f'blocks {missing} need it')
    dim = backbone.embed_dims
    results = {}
    for block in needing:
        entry = stored[block]
        if not isinstance(entry, dict):
            raise ValueError(f'whitening file {path!r}: blocks[{block}] must '
                             f'be a dict, got {type(entry).__name__}')
        where = f'blocks[{block}]'
        matrix = _real_matrix(path, block, 'whitening',
                              entry.get('whitening'), dim)
        if not bool(torch.isfinite(matrix).all()):
            raise _refuse(path, f'block {block}: the whitening matrix has '
                          'non-finite values')
        _check_zca(path, block, matrix)
        sigma = entry.get('sigma')
        if sigma is not None:
            sigma = _real_matrix(path, block, 'sigma', sigma, dim)
        fingerprint = entry.get('qkv_fingerprint')
        if fingerprint is not None:
            fingerprint = float(_typed_field(
                path, f'{where}.qkv_fingerprint', fingerprint, (int, float)))
        if check_weights and fingerprint is not None:
            want, have = fingerprint, _fingerprint(backbone, block)
            if not math.isclose(want, have, rel_tol=_FINGERPRINT_RTOL):
                raise _refuse(
                    path, f'block {block}: it was computed with other '
                    f'attention weights (|qkv.weight| {want:.6g} in the '
                    f'file, {have:.6g} in the model); compute it again '
                    'after loading the pretrained weights')
        results[block] = {
            'whitening': matrix.to(torch.float32),
            'sigma': sigma,
            'num_tokens': _typed_field(path, f'{where}.num_tokens',
                                       entry.get('num_tokens', 0), int),
            'num_dropped_tokens': _typed_field(
                path, f'{where}.num_dropped_tokens',
                entry.get('num_dropped_tokens', 0), int),
            'num_images': _typed_field(path, f'{where}.num_images',
                                       entry.get('num_images', 0), int),
            'condition_number': float(_typed_field(
                path, f'{where}.condition_number',
                entry.get('condition_number', float('nan')), (int, float))),
        }
    if return_info:
        info = {k: v for k, v in payload.items() if k != 'blocks'}
        return results, info
    return results


def format_whitening_table(results: Dict[int, Dict[str, Any]]) -> str:
    """One line per block: images, tokens kept in the statistic, padding
    tokens dropped, condition number, effective rank of ``Sigma`` (see
    :func:`bpt_mm.whitening.effective_rank`), seconds."""
    lines = [f"{'block':>5} {'images':>7} {'tokens':>9} {'dropped':>9} "
             f"{'cond':>11} {'rank':>6} {'seconds':>8}"]
    for block in sorted(results):
        r = results[block]
        seconds = r.get('seconds')
        rank = r.get('effective_rank')
        lines.append(f"{block:>5} {r.get('num_images', 0):>7} "
                     f"{r.get('num_tokens', 0):>9} "
                     f"{r.get('num_dropped_tokens', 0):>9} "
                     f"{r.get('condition_number', float('nan')):>11.4g} "
                     + (f'{rank:>6} ' if rank is not None else f"{'-':>6} ")
                     + (f'{seconds:>8.2f}' if seconds is not None else
                        f"{'-':>8}"))
    return '\n'.join(lines)
