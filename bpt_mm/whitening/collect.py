"""Whitening and SPT prototypes of a :class:`~bpt_mm.models.PromptedViT`
from data (torch only).

The tokens -> ``Sigma`` -> ``W`` pipeline, in two steps that every user of
it shares (``BPTWhiteningHook``, ``tools/compute_whitening.py``, the
burstiness analysis and :func:`whitening_from_tokens`):

* :func:`accumulate_tokens`: project tokens with a block's query-key
  product and add them to an accumulator (float64);
* :func:`solve_whitening`: ``Sigma`` of the accumulator, and from its one
  eigendecomposition ``W``, the condition number and the effective rank.

On a backbone:

* :func:`collect_whitening` feeds image batches through the ViT, block by
  block, and whitens every prompted block whose prompt needs it; across
  ``torch.distributed`` processes the statistics are summed and ``W`` is
  computed on rank 0 and broadcast, so every rank holds the same bits.
* :func:`collect_prototypes`: the same image pass for SPT prompts, whose
  initial values are prototypes of the tokens
  (:mod:`bpt_mm.whitening.prototypes`) gathered from every process,
  computed on rank 0 and broadcast.
* :func:`apply_whitening` writes results into the prompts (``W`` into a
  :class:`~bpt_mm.models.WhitenedPrompt`, ``B = W C`` into a
  whitening-initialised :class:`~bpt_mm.models.BilinearPrompt`).

Deep prompts are handled *block by block*: the tokens of block ``i`` are
taken with the prompts of the earlier blocks already holding their result,
i.e. on the tokens block ``i`` sees when training starts. This costs one
partial forward pass over the (cached) images per prompted block; the pass
(:func:`_block_by_block`) is shared by whitening and prototypes, each
keeping only its own gather / reduce / solve / write step.

Nothing here imports mmengine; the hook (``bpt_mm.engine.BPTWhiteningHook``)
and the tools are thin glue around these functions. The whitening file is
:mod:`bpt_mm.whitening.io`.
"""
import time
import warnings
from typing import (TYPE_CHECKING, Any, Dict, Iterable, Iterator, List,
                    Optional, Sequence, Tuple, Union)

import torch
import torch.distributed as dist
from torch import Tensor

from .accumulators import (ImageAverageAccumulator, RankDeficientWarning,
                           TokenAccumulator, as_float64_rows)
from .distributed import comm_device, dist_ready, synchronise_errors
from .linalg import (WhiteningSpectrum, bilinear_basis, project_tokens,
                     qk_product, query_key_product, sigma_eigenvectors,
                     whitening_spectrum)
from .options import (NUM_IMAGES, SEED, WhiteningOptions, check_positive_int,
                      check_seed, label_prefix)
from .prototypes import (KMEANS_ITERS, PROTOTYPE_TOKENS, TokenReservoir,
                         compute_prototypes, per_rank_capacity)
from .real_tokens import ImageBatch, as_image_batch, real_patch_mask, real_rows

if TYPE_CHECKING:  # pragma: no cover
    from bpt_mm.models import PromptedViT

__all__ = [
    'accumulate_tokens', 'solve_whitening', 'whitening_from_tokens',
    'block_token_rows', 'block_product', 'whitening_blocks',
    'missing_whitening_blocks',
    'collect_whitening', 'run_whitening', 'apply_whitening',
    'format_whitening_table',
    'prototype_blocks', 'missing_prototype_blocks', 'prototype_source',
    'prototype_tokens', 'collect_prototypes', 'run_prototypes',
    'format_prototype_table'
]


# ---------------------------------------------------------------------------
# The pipeline: tokens -> Sigma -> W
# ---------------------------------------------------------------------------
def accumulate_tokens(acc: TokenAccumulator, tokens: Tensor,
                      product: Tensor) -> TokenAccumulator:
    """Project ``tokens`` with ``product`` and add them to ``acc``.

    The tokens are checked before projecting: ``M`` mixes channels, so one
    bad input value would be reported as ``d`` bad ones.

    Args:
        acc (TokenAccumulator): From
            :meth:`~bpt_mm.whitening.options.WhiteningOptions.make_accumulator`.
        tokens (Tensor): Unprojected tokens ``(..., d)``; ``(B, n, d)`` or
            ``(n, d)`` for the authors' statistic.
        product (Tensor): The block's query-key product ``(d, d)`` (float64
            keeps the projection exact to float64).

    Returns:
        TokenAccumulator: ``acc``.
    """
    rows = as_float64_rows(tokens, acc.dim, acc.name, '`tokens`')
    return acc.update(project_tokens(rows, product))


def solve_whitening(acc: TokenAccumulator, options: WhiteningOptions,
                    dtype: torch.dtype = torch.float32) -> Dict[str, Any]:
    """``Sigma`` of ``acc`` and, from one eigendecomposition, its ZCA.

    Args:
        acc (TokenAccumulator): The accumulated statistic.
        options (WhiteningOptions): ``center`` and ``eps``.
        dtype (torch.dtype): Dtype of ``W``. Defaults to float32.

    Returns:
        dict: ``sigma`` (float64 CPU), ``whitening`` (``W``, CPU),
        ``condition_number`` (float) and ``effective_rank`` (int).
    """
    return _solve(acc, options, dtype)[0]


def _solve(acc: TokenAccumulator, options: WhiteningOptions,
           dtype: torch.dtype = torch.float32
           ) -> Tuple[Dict[str, Any], WhiteningSpectrum]:
    """:func:`solve_whitening`'s dict, and the spectrum it came from (its
    eigenvectors also give a bilinear prompt's ``'eigen'`` basis)."""
    sigma = acc.second_moment(center=options.center).cpu()
    spectrum = whitening_spectrum(sigma, options)
    return {
        'whitening': spectrum.whitening(dtype),
        'sigma': sigma,
        'condition_number': spectrum.condition_number(),
        'effective_rank': spectrum.effective_rank(),
    }, spectrum


def whitening_from_tokens(
    tokens: Union[Tensor, Iterable[Tensor]],
    qkv_weight: Tensor,
    options: Optional[WhiteningOptions] = None,
    name: Optional[str] = None,
) -> Tuple[Tensor, Dict[str, Any]]:
    """Whitening matrix of one block from its (unprojected) tokens.

    :func:`accumulate_tokens` and :func:`solve_whitening` over given tokens
    rather than a backbone's; selecting the tokens (``options.tokens``,
    ``options.source``) is the caller's job.

    Args:
        tokens (Tensor | Iterable[Tensor]): Tokens ``(..., d)``, or batches
            of them. For ``statistic='authors'`` each tensor is
            ``(B, n, d)`` or one image ``(n, d)``.
        qkv_weight (Tensor): The block's ``attn.qkv.weight``, ``(3d, d)``.
        options (WhiteningOptions, optional): Defaults to the paper's.
        name (str, optional): Block label for messages and warnings.

    Returns:
        tuple[Tensor, dict]: ``W`` (float32, ``(d, d)``) and a dict with
        ``num_tokens`` (N), ``num_images`` (authors' statistic only),
        ``dim``, ``eps``, ``condition_number``, ``effective_rank`` and
        ``sigma`` (the float64 second moment, e.g. for
        :func:`~bpt_mm.whitening.linalg.whitened_bilinear_basis`).

    Examples:
        >>> import torch
        >>> x, qkv = torch.randn(500, 8), torch.randn(24, 8)
        >>> w, info = whitening_from_tokens(x, qkv, name='block 0')
        >>> w.shape, info['num_tokens']
        (torch.Size([8, 8]), 500)
    """
    options = WhiteningOptions() if options is None else options
    if not isinstance(options, WhiteningOptions):
        raise ValueError('`options` must be a WhiteningOptions, got '
                         f'{type(options).__name__}')
    if isinstance(qkv_weight, Tensor):
        # Form M in float64: it multiplies every token.
        qkv_weight = qkv_weight.detach().to(torch.float64)
    product = query_key_product(qkv_weight, order=options.product)
    dim = product.shape[0]
    acc = options.make_accumulator(dim, name=name)
    batches = [tokens] if isinstance(tokens, Tensor) else tokens
    for batch in batches:
        if not isinstance(batch, Tensor) or batch.dim() == 0 \
                or batch.shape[-1] != dim:
            shape = tuple(batch.shape) if isinstance(batch, Tensor) \
                else type(batch).__name__
            raise ValueError(f'{label_prefix(name)}`tokens` must be (..., '
                             f'{dim}) to match `qkv_weight`, got {shape}')
        accumulate_tokens(acc, batch, product)
    solved = solve_whitening(acc, options)
    info: Dict[str, Any] = {
        'num_tokens': acc.num_tokens,
        'dim': dim,
        'eps': options.eps,
        'condition_number': solved['condition_number'],
        'effective_rank': solved['effective_rank'],
        'sigma': solved['sigma'],
    }
    if isinstance(acc, ImageAverageAccumulator):
        info['num_images'] = acc.num_images
    return solved['whitening'], info


# ---------------------------------------------------------------------------
# Blocks and tokens of a backbone
# ---------------------------------------------------------------------------
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


def prototype_blocks(backbone: 'PromptedViT') -> List[int]:
    """Blocks whose prompt is initialised from prototypes (SPT), ascending."""
    return sorted(i for i, p in backbone.prompt_modules().items()
                  if p.needs_prototypes)


def missing_prototype_blocks(backbone: 'PromptedViT') -> List[int]:
    """Blocks whose SPT prompt has not got its prototypes (this rank)."""
    prompts = backbone.prompt_modules()
    return [i for i in prototype_blocks(backbone)
            if not bool(prompts[i].prototypes_ready)]


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


def _patch_mask(backbone: 'PromptedViT', batch: ImageBatch) -> Tensor:
    """:func:`~bpt_mm.whitening.real_tokens.real_patch_mask` on the
    backbone's grid (it pads the images to a multiple of the patch size)."""
    p = backbone.patch_size
    height, width = batch.images.shape[-2:]
    return real_patch_mask(batch.img_shapes, (-(-height // p), -(-width // p)),
                           p, batch.images.shape[0],
                           device=batch.images.device)


def block_token_rows(backbone: 'PromptedViT', batch: Union[Tensor,
                                                           ImageBatch],
                     blocks: Sequence[int],
                     options: Optional[WhiteningOptions] = None
                     ) -> Tuple[Dict[int, Tensor], int]:
    """The real tokens of :meth:`~bpt_mm.models.PromptedViT.block_tokens`
    as rows, padding dropped.

    Patches that cover only padding (see :mod:`bpt_mm.whitening.real_tokens`:
    a patch is kept when it overlaps its image's ``img_shape``) are left
    out; the class token (``options.tokens == 'all'``) is always kept.

    Args:
        backbone (PromptedViT): The backbone.
        batch (Tensor | ImageBatch): Images, with their real sizes when
            padded.
        blocks (Sequence[int]): Block indices.
        options (WhiteningOptions, optional): Token selection (``tokens``,
            ``source``); default the paper's.

    Returns:
        tuple[dict[int, Tensor], int]: ``(N, d)`` rows per block, and the
        number of tokens dropped per block (the same for every block).
    """
    options = WhiteningOptions() if options is None else options
    batch = as_image_batch(batch)
    # Options checked when built: the tap's unchecked body serves.
    tokens = backbone.tap_tokens(batch.images, blocks, options.tokens,
                                 options.source)
    mask = _patch_mask(backbone, batch)
    leading = backbone.num_prefix_tokens if options.tokens == 'all' else 0
    rows = {i: real_rows(t, mask, leading) for i, t in tokens.items()}
    return rows, int(mask.numel() - mask.sum())


def block_product(backbone: 'PromptedViT', block: int,
                  options: WhiteningOptions) -> Tensor:
    """Block ``block``'s query-key product (``options.product``) in float64
    (from float64 weights: it multiplies every token).

    Args:
        backbone (PromptedViT): The backbone whose block is read.
        block (int): Index of the block in ``backbone.blocks``.
        options (WhiteningOptions): Its ``product`` chooses ``M``.

    Returns:
        Tensor: ``M``, ``(d, d)`` float64.
    """
    weight = backbone.blocks[block].attn.qkv.weight.detach()
    # WhiteningOptions checked `product`, the block holds a (3d, d) qkv:
    # the unchecked body serves.
    return qk_product(weight.to(torch.float64), options.product)


# ---------------------------------------------------------------------------
# The pass over the blocks, shared by whitening and prototypes
# ---------------------------------------------------------------------------
def _limited_images(batches: Iterable[Union[Tensor, ImageBatch]],
                    num_images: int, device: torch.device,
                    cache: Optional[List[ImageBatch]]
                    ) -> Iterator[ImageBatch]:
    """The first ``num_images`` images of ``batches`` (the last batch cut).

    A batch is a ``(B, C, H, W)`` tensor (every pixel is image) or an
    :class:`~bpt_mm.whitening.real_tokens.ImageBatch` that also gives each
    image's real size. No batch is drawn once the count is reached, so a
    data loader loads no more than needed. Batches are appended to ``cache``
    when it is a list.
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


class _BlockStep:
    """What one kind of result does per block in :func:`_block_by_block`.

    ``gather`` runs on every rank over its images and returns its state and
    integer counts (summed over the ranks by the pass); ``reduce`` combines
    the states over the ranks (when ``distributed``) and may refuse them on
    every rank alike; ``solve`` runs on rank 0 only; ``broadcast`` gives its
    result to every rank; ``write`` puts it into the prompt and returns the
    block's result dict.
    """

    #: What is gathered and what is solved, for error messages.
    gathering = solving = ''

    def gather(self, block: int, images: Iterable[ImageBatch]
               ) -> Tuple[Any, List[int]]:
        raise NotImplementedError

    def reduce(self, block: int, state: Any, counts: List[int],
               distributed: bool) -> Any:
        raise NotImplementedError

    def solve(self, block: int, state: Any, counts: List[int]) -> Any:
        raise NotImplementedError

    def broadcast(self, block: int, solved: Any) -> Any:
        raise NotImplementedError

    def write(self, block: int, state: Any, counts: List[int],
              solved: Any) -> Dict[str, Any]:
        raise NotImplementedError


def _block_by_block(backbone: 'PromptedViT',
                    batches: Iterable[Union[Tensor, ImageBatch]],
                    blocks: List[int], num_images: int, distributed: bool,
                    step: _BlockStep) -> Dict[int, Dict[str, Any]]:
    """Run ``step`` over ``blocks`` (ascending) with the first
    ``num_images`` images of ``batches``.

    Eval mode (restored afterwards), no grad; the images are drawn once and
    cached on the backbone's device when more than one block needs them;
    each block's result is written before the next block is gathered; a
    failure on any rank is raised on every rank (see
    :func:`~bpt_mm.whitening.distributed.synchronise_errors`); the counts
    are summed over the ranks.

    Returns:
        dict[int, dict]: ``step.write``'s result per block, with
        ``seconds`` (this process's wall time).
    """
    if not blocks:
        return {}
    use_dist = distributed and dist_ready()
    device = _module_device(backbone)
    was_training = backbone.training
    cache: Optional[List[ImageBatch]] = [] if len(blocks) > 1 else None
    results: Dict[int, Dict[str, Any]] = {}
    backbone.eval()
    try:
        with torch.no_grad():
            for position, block in enumerate(blocks):
                start = time.perf_counter()
                error = state = counts = None
                try:
                    images = _limited_images(batches, num_images, device,
                                             cache) if position == 0 \
                        else cache
                    state, counts = step.gather(block, images)
                except Exception as exc:  # noqa: BLE001 (re-raised below)
                    error = exc
                synchronise_errors(error, f'{step.gathering} of block '
                                   f'{block}', use_dist)
                if use_dist:
                    total = torch.tensor(counts, dtype=torch.int64,
                                         device=comm_device())
                    dist.all_reduce(total, op=dist.ReduceOp.SUM)
                    counts = [int(c) for c in total.tolist()]
                if counts[0] == 0:
                    # Summed over the ranks: refused on every rank alike.
                    raise ValueError(
                        f'{step.gathering} of block {block}: the batches '
                        'gave no image (an empty data set or loader?); '
                        'there is nothing to compute from')
                # Same counts on every rank after the reduction, so a
                # refusal here is raised on every rank and none waits in a
                # collective.
                state = step.reduce(block, state, counts, use_dist)
                solved = None
                if not use_dist or dist.get_rank() == 0:
                    try:
                        solved = step.solve(block, state, counts)
                    except Exception as exc:  # noqa: BLE001
                        error = exc
                synchronise_errors(error, step.solving.format(
                    block=block, state=state, counts=counts), use_dist)
                if use_dist:
                    solved = step.broadcast(block, solved)
                # Written now: the next block's tokens must see it.
                result = step.write(block, state, counts, solved)
                result['seconds'] = time.perf_counter() - start
                results[block] = result
    finally:
        backbone.train(was_training)
    return results


# ---------------------------------------------------------------------------
# Whitening
# ---------------------------------------------------------------------------
def _bilinear_basis(whitening: Tensor, eigenvectors: Optional[Tensor],
                    prompt: torch.nn.Module, block: int, bilinear_init: str,
                    seed: int) -> Tensor:
    # From the float32 W that is stored, on the CPU, with a generator seeded
    # per block: a file gives back the same B bit for bit. The prompt's
    # options checked `basis_rank` (p <= d with whitening_init) and
    # WhiteningOptions `bilinear_init`: the unchecked body serves.
    generator = torch.Generator().manual_seed(seed + block)
    return bilinear_basis(whitening.cpu(), prompt.basis_rank, bilinear_init,
                          eigenvectors, generator)


class _WhiteningStep(_BlockStep):
    """Per block: accumulate ``X~`` of the real tokens entering it, sum
    over the ranks, solve ``W`` (and ``B``) on rank 0, broadcast, write."""

    gathering = 'collecting the statistics'
    solving = 'whitening block {block}'

    def __init__(self, backbone: 'PromptedViT', options: WhiteningOptions,
                 seed: int, allow_few_tokens: bool) -> None:
        self.backbone = backbone
        self.options = options
        self.seed = seed
        self.allow_few_tokens = allow_few_tokens
        self.prompts = backbone.prompt_modules()
        self.dim = backbone.embed_dims

    def gather(self, block: int, images: Iterable[ImageBatch]
               ) -> Tuple[TokenAccumulator, List[int]]:
        """The accumulator, and the image and dropped-padding counts."""
        backbone, options = self.backbone, self.options
        product = block_product(backbone, block, options)
        acc = options.make_accumulator(self.dim, name=f'block {block}',
                                       device=_module_device(backbone))
        num_images = dropped = padding_kept = 0
        for batch in images:
            if options.statistic == 'authors':
                # Their per-position image average needs every position of
                # every image: padding patches stay in, and the user is
                # told once per block (below), not once per batch.
                tokens = backbone.tap_tokens(
                    batch.images, [block], options.tokens,
                    options.source)[block]
                padding_kept += int((~_patch_mask(backbone, batch)).sum())
            else:
                rows, padding = block_token_rows(backbone, batch, [block],
                                                 options)
                tokens = rows[block]
                dropped += padding
            accumulate_tokens(acc, tokens, product)
            num_images += batch.images.shape[0]
        if padding_kept:
            warnings.warn(
                f'block {block}: statistic=\'authors\' averages every '
                f'token position over the images, so {padding_kept} '
                f'padding patch tokens of these {num_images} images are in '
                f"it; use statistic='paper' to leave them out")
        return acc, [num_images, dropped]

    def reduce(self, block: int, acc: TokenAccumulator, counts: List[int],
               distributed: bool) -> TokenAccumulator:
        if distributed:
            acc.all_reduce()
        if not self.allow_few_tokens and self.options.statistic == 'paper' \
                and acc.num_tokens < self.dim:
            raise ValueError(
                f'whitening block {block}: only {acc.num_tokens} tokens '
                f'from {counts[0]} images for d={self.dim} channels; the '
                f'statistic needs at least {self.dim} tokens (the paper '
                f'uses N >> d), so use more images (`num_images`) or set '
                'allow_few_tokens=True')
        return acc

    def solve(self, block: int, acc: TokenAccumulator,
              counts: List[int]) -> Dict[str, Any]:
        """``Sigma``, ``W``, condition number, effective rank (and ``B``),
        on the CPU."""
        solved, spectrum = _solve(acc, self.options)
        prompt = self.prompts[block]
        if prompt.basis_rank is not None:
            solved['basis'] = _bilinear_basis(
                solved['whitening'], spectrum.eigenvectors, prompt, block,
                self.options.bilinear_init, self.seed)
        return solved

    def broadcast(self, block: int, solved: Optional[Dict[str, Any]]
                  ) -> Dict[str, Any]:
        """Rank 0's ``solved`` on every rank, in one float64 buffer."""
        dim, rank_p = self.dim, self.prompts[block].basis_rank
        numel = 2 * dim * dim + 2 + (dim * rank_p if rank_p else 0)
        device = comm_device()
        if dist.get_rank() == 0:
            parts = [solved['sigma'].reshape(-1),
                     solved['whitening'].to(torch.float64).reshape(-1),
                     torch.tensor([solved['condition_number'],
                                   solved['effective_rank']],
                                  dtype=torch.float64)]
            if rank_p:
                parts.append(solved['basis'].to(torch.float64).reshape(-1))
            flat = torch.cat(parts).to(device)
        else:
            flat = torch.empty(numel, dtype=torch.float64, device=device)
        dist.broadcast(flat, src=0)
        flat = flat.cpu()
        d2 = dim * dim
        # float32 -> float64 -> float32 is exact: every rank gets rank 0's
        # bits.
        out = {
            'sigma': flat[:d2].reshape(dim, dim).clone(),
            'whitening': flat[d2:2 * d2].reshape(dim, dim).to(torch.float32),
            'condition_number': float(flat[2 * d2]),
            'effective_rank': int(flat[2 * d2 + 1]),
        }
        if rank_p:
            out['basis'] = flat[2 * d2 + 2:].reshape(dim, rank_p).to(
                torch.float32)
        return out

    def write(self, block: int, acc: TokenAccumulator, counts: List[int],
              solved: Dict[str, Any]) -> Dict[str, Any]:
        num_images, dropped = counts
        result = dict(solved, num_tokens=acc.num_tokens,
                      num_dropped_tokens=dropped, num_images=num_images)
        rank = result['effective_rank']
        if rank < self.dim / 2:
            # Same on every rank: the rank is rank 0's.
            warnings.warn(
                f'whitening block {block}: Sigma has effective rank {rank} '
                f'of d={self.dim} ({num_images} images): the images vary '
                f'too little (uniform or near-identical images?), so in '
                f'{self.dim - rank} directions W is set by eps alone, not by'
                f' the data; check the training images the whitening reads',
                RankDeficientWarning, stacklevel=4)
        self.prompts[block].apply_whitening(result)
        return result


def collect_whitening(backbone: 'PromptedViT',
                      batches: Iterable[Tensor],
                      options: Optional[WhiteningOptions] = None,
                      num_images: int = NUM_IMAGES,
                      distributed: bool = True,
                      blocks: Optional[Sequence[int]] = None,
                      seed: int = SEED,
                      allow_few_tokens: bool = True
                      ) -> Dict[int, Dict[str, Any]]:
    """Compute (and write) the whitening of every prompt that needs it.

    For each block ``i`` whose prompt needs whitening (ascending), the first
    ``num_images`` images of ``batches`` are run through the backbone up to
    block ``i`` (eval mode, no grad), the tokens entering block ``i`` are
    selected (``options.tokens``: patches, or CLS + patches; never
    prompts; never patches of padding), taken before or after ``norm1``
    (``options.source``), projected with the block's query-key product
    (``options.product``) and accumulated in float64. ``W = zca(Sigma)``
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
            batches ``(B, C, H, W)``, or :class:`~bpt_mm.whitening.
            real_tokens.ImageBatch` with each image's real size: then
            patches that cover only padding are left out of the statistic
            (see :mod:`bpt_mm.whitening.real_tokens`); consumed once (images
            are cached on the backbone's device when more than one block
            needs them).
        options (WhiteningOptions, optional): Every whitening option
            (``bilinear_init`` chooses ``C`` of ``B = W C`` for
            whitening-initialised bilinear prompts); default the paper's.
        num_images (int): Images to use (per process), a positive int.
            Defaults to 100.
        distributed (bool): Reduce over ``torch.distributed`` processes when
            it is initialised. Defaults to True.
        blocks (Sequence[int], optional): Only these blocks (each must need
            whitening); default every block that needs it.
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
        ``condition_number``, ``effective_rank`` and ``seconds`` (this
        process's wall time).
    """
    options = WhiteningOptions() if options is None else options
    if not isinstance(options, WhiteningOptions):
        raise ValueError('`options` must be a WhiteningOptions, got '
                         f'{type(options).__name__}')
    check_seed(seed)
    check_positive_int(num_images, 'num_images')
    return run_whitening(backbone, batches, options, num_images, distributed,
                         blocks, seed, allow_few_tokens)


def run_whitening(backbone: 'PromptedViT',
                  batches: Iterable[Union[Tensor, ImageBatch]],
                  options: WhiteningOptions, num_images: int,
                  distributed: bool, blocks: Optional[Sequence[int]],
                  seed: int, allow_few_tokens: bool
                  ) -> Dict[int, Dict[str, Any]]:
    """The body of :func:`collect_whitening`, for arguments already
    checked: ``BPTWhiteningHook`` checks its options once, when it is
    built, and passes them here. Direct callers use
    :func:`collect_whitening`, which checks ``options``, ``num_images``
    and ``seed`` and calls this (same arguments, same results).
    """
    blocks = _chosen_blocks(whitening_blocks(backbone), blocks,
                            'prompt that needs whitening')
    if options.tokens == 'all' and not backbone.num_prefix_tokens and blocks:
        # Not an error (the patches are all there is), but the user asked
        # for the class token and should not believe it is in.
        warnings.warn("tokens='all' asks for the class token and the "
                      'patches, but this backbone has no class token '
                      "(class_token=False): the statistic is that of "
                      "tokens='patch'")
    step = _WhiteningStep(backbone, options, seed, allow_few_tokens)
    return _block_by_block(backbone, batches, blocks, num_images,
                           distributed, step)


def apply_whitening(backbone: 'PromptedViT',
                    results: Dict[int, Dict[str, Any]],
                    options: Optional[WhiteningOptions] = None,
                    seed: int = SEED) -> List[int]:
    """Write whitening results (e.g. from
    :func:`~bpt_mm.whitening.io.load_whitening`) into prompts.

    ``W`` goes into a WhitenedPrompt; a whitening-initialised
    BilinearPrompt gets ``B = W C`` (``results[i]['basis']`` when present,
    else built from ``W`` with ``options.bilinear_init`` and the generator
    seeded ``seed + i``, as :func:`collect_whitening` does), in the module's
    dtype and device. :func:`collect_whitening` already writes its results;
    this is for results loaded from a file.

    Args:
        backbone (PromptedViT): The backbone; its prompts are modified.
        results (dict[int, dict]): Per block, at least ``whitening``.
        options (WhiteningOptions, optional): Its ``bilinear_init``;
            default the paper's.
        seed (int): Seed of the random ``C``.

    Returns:
        list[int]: The blocks written.
    """
    options = WhiteningOptions() if options is None else options
    if not isinstance(options, WhiteningOptions):
        raise ValueError('`options` must be a WhiteningOptions, got '
                         f'{type(options).__name__}')
    prompts = backbone.prompt_modules()
    needing = whitening_blocks(backbone)
    wrong = sorted(set(results) - set(needing))
    if wrong:
        raise ValueError(f'whitening results for blocks {wrong}, which have '
                         f'no prompt that needs whitening ({needing} do)')
    for block in sorted(results):
        prompt, result = prompts[block], dict(results[block])
        if prompt.basis_rank is not None and 'basis' not in result:
            eigenvectors = None
            if options.bilinear_init == 'eigen':
                if result.get('sigma') is None:
                    raise ValueError(
                        f"block {block}: `bilinear_init`='eigen' needs the "
                        "second moment `sigma`, which these results lack")
                eigenvectors = sigma_eigenvectors(result['sigma'])
            result['basis'] = _bilinear_basis(result['whitening'],
                                              eigenvectors, prompt, block,
                                              options.bilinear_init, seed)
        prompt.apply_whitening(result)
    return sorted(results)


def format_whitening_table(results: Dict[int, Dict[str, Any]]) -> str:
    """One line per block: images, tokens kept in the statistic, padding
    tokens dropped, condition number, effective rank of ``Sigma`` (see
    :meth:`bpt_mm.whitening.linalg.WhiteningSpectrum.effective_rank`),
    seconds."""
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


# ---------------------------------------------------------------------------
# SPT prototypes: the same pass, another per-block result
# ---------------------------------------------------------------------------
def prototype_source(backbone: 'PromptedViT', block: int) -> str:
    """The token source of block ``block``'s SPT prompt: its ``source``, or
    by depth as the authors (shallow: the patch embedding; deep: the
    block's input)."""
    source = backbone.prompt_modules()[block].source
    if source is None:
        deep = backbone.prompt_config.depth == 'deep'
        source = 'block_input' if deep else 'patch_embed'
    return source


def prototype_tokens(backbone: 'PromptedViT', x: Tensor, block: int,
                     source: str) -> Tensor:
    """The patch tokens SPT prototypes of ``block`` are drawn from.

    ``'block_input'``: the patch tokens entering the block
    (:meth:`~bpt_mm.models.PromptedViT.block_tokens`, never CLS or
    prompts). ``'patch_embed'``: the patch embedding of the (padded) images
    before the position embedding, read from the ``patch_embed`` module's
    output while the backbone embeds ``x``.

    Returns:
        Tensor: ``(B, n, d)``.
    """
    if source == 'block_input':
        return backbone.block_tokens(x, [block])[block]
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
    device = comm_device()
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


class _PrototypeStep(_BlockStep):
    """Per block: a reservoir of the real patch tokens, gathered over the
    ranks, prototypes on rank 0, broadcast, written into the prompt."""

    gathering = 'collecting the SPT tokens'
    solving = ('computing the SPT prototypes of block {block} '
               '({counts[0]} images, {state.shape[0]} tokens kept)')

    def __init__(self, backbone: 'PromptedViT', seed: int, capacity: int,
                 kmeans_iters: int) -> None:
        self.backbone = backbone
        self.seed = seed
        self.capacity = capacity
        self.kmeans_iters = kmeans_iters
        self.prompts = backbone.prompt_modules()
        self.sources: Dict[int, str] = {}

    def gather(self, block: int, images: Iterable[ImageBatch]
               ) -> Tuple[TokenReservoir, List[int]]:
        """The reservoir, and the image and token counts."""
        backbone = self.backbone
        source = self.sources[block] = prototype_source(backbone, block)
        reservoir = TokenReservoir(self.capacity, backbone.embed_dims,
                                   seed=self.seed + block,
                                   name=f'block {block}')
        num_images = 0
        for batch in images:
            # Only real image tokens: padding patches would become
            # prototypes (see bpt_mm.whitening.real_tokens).
            tokens = prototype_tokens(backbone, batch.images, block, source)
            reservoir.update(real_rows(tokens, _patch_mask(backbone, batch)))
            num_images += batch.images.shape[0]
        return reservoir, [num_images, reservoir.num_seen]

    def reduce(self, block: int, reservoir: TokenReservoir,
               counts: List[int], distributed: bool) -> Tensor:
        """The kept rows, of every rank when ``distributed``."""
        rows = reservoir.rows
        return _gather_rows(rows) if distributed else rows

    def solve(self, block: int, rows: Tensor, counts: List[int]) -> Tensor:
        prompt = self.prompts[block]
        num_images, num_tokens = counts
        if rows.shape[0] < prompt.num_tokens:
            raise ValueError(
                f'block {block}: {prompt.num_tokens} SPT prototypes need at '
                f'least as many tokens; {num_tokens} were seen in '
                f'{num_images} images and {rows.shape[0]} kept. Use more '
                'images (`num_images`), a larger `prototype_tokens` or '
                'fewer prompts (`prompt.num_tokens`)')
        return compute_prototypes(rows, prompt.num_tokens, prompt.init,
                                  seed=self.seed + block,
                                  kmeans_iters=self.kmeans_iters,
                                  name=f'block {block}')

    def broadcast(self, block: int, solved: Optional[Tensor]) -> Tensor:
        if solved is None:
            solved = torch.empty(self.prompts[block].num_tokens,
                                 self.backbone.embed_dims)
        solved = solved.to(comm_device())
        dist.broadcast(solved, src=0)
        return solved.cpu()

    def write(self, block: int, rows: Tensor, counts: List[int],
              solved: Tensor) -> Dict[str, Any]:
        prompt = self.prompts[block]
        target = prompt.tokens
        prompt.set_prototypes(solved.to(device=target.device,
                                        dtype=target.dtype))
        num_images, num_tokens = counts
        return dict(prototypes=solved, init=prompt.init,
                    source=self.sources[block], num_images=num_images,
                    num_tokens=num_tokens, num_kept=int(rows.shape[0]))


def collect_prototypes(backbone: 'PromptedViT',
                       batches: Iterable[Union[Tensor, ImageBatch]],
                       num_images: int = NUM_IMAGES,
                       distributed: bool = True,
                       blocks: Optional[Sequence[int]] = None,
                       seed: int = SEED,
                       max_tokens: int = PROTOTYPE_TOKENS,
                       kmeans_iters: int = KMEANS_ITERS
                       ) -> Dict[int, Dict[str, Any]]:
    """Compute (and write) the prototypes of every SPT prompt.

    The image pass is :func:`collect_whitening`'s: the first ``num_images``
    images of ``batches`` per process (cached when several blocks need
    them), eval mode, no grad, blocks in ascending order, each block's
    result written before the next block is collected (a deep prompt's
    tokens see the earlier prototypes as training will), and a failure on
    any rank raised on every rank. Per block the tokens of
    :func:`prototype_tokens` go into a :class:`~bpt_mm.whitening.prototypes.
    TokenReservoir` of at most ``max_tokens`` rows over all processes
    (``ceil(max_tokens / world_size)`` per process); the reservoirs are
    gathered, rank 0 computes the prompt's ``init`` with
    :func:`~bpt_mm.whitening.prototypes.compute_prototypes` seeded
    ``seed + block``, and broadcasts the result, so every rank holds the
    same bits. While no reservoir overflows, the result does not depend on
    how the images were split over processes or ordered.

    Args:
        backbone (PromptedViT): The backbone; its SPT prompts are modified.
        batches (Iterable[Tensor | ImageBatch]): Preprocessed image
            batches ``(B, C, H, W)``, with each image's real size when
            padded (padding patches are left out); consumed once.
        num_images (int): Images to use (per process), a positive int.
            Defaults to 100.
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
    check_positive_int(max_tokens, 'max_tokens')
    check_positive_int(kmeans_iters, 'kmeans_iters')
    check_seed(seed)
    check_positive_int(num_images, 'num_images')
    return run_prototypes(backbone, batches, num_images, distributed, blocks,
                          seed, max_tokens, kmeans_iters)


def run_prototypes(backbone: 'PromptedViT',
                   batches: Iterable[Union[Tensor, ImageBatch]],
                   num_images: int, distributed: bool,
                   blocks: Optional[Sequence[int]], seed: int,
                   max_tokens: int, kmeans_iters: int
                   ) -> Dict[int, Dict[str, Any]]:
    """The body of :func:`collect_prototypes`, for arguments already
    checked (by ``BPTWhiteningHook`` when it is built). Direct callers use
    :func:`collect_prototypes`, which checks and calls this.
    """
    blocks = _chosen_blocks(prototype_blocks(backbone), blocks,
                            'SPT prompt')
    world = dist.get_world_size() if distributed and dist_ready() else 1
    step = _PrototypeStep(backbone, seed, per_rank_capacity(max_tokens, world),
                          kmeans_iters)
    return _block_by_block(backbone, batches, blocks, num_images,
                           distributed, step)


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
