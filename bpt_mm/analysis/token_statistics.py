"""Measure burstiness on a :class:`~bpt_mm.models.PromptedViT` (torch only).

For each chosen block this runs images through the frozen backbone and
measures, with :mod:`bpt_mm.analysis.burstiness`, the distributions of

* ``x``: the tokens ``X`` entering the block (those the whitening statistic
  uses: patches, before ``norm1`` by default; see
  :class:`~bpt_mm.whitening.options.WhiteningOptions`);
* ``qk_product``: the entries of ``M = W_q^T W_k``
  (:func:`~bpt_mm.whitening.linalg.query_key_product`);
* ``projected``: the entries of ``X~ = M X^T``
  (:func:`~bpt_mm.whitening.linalg.project_tokens`), whose values a
  prompt's logits are linear in;
* ``whitened``: the entries of ``X~`` whitened by ``W = Sigma^{-1/2}``,
  the ZCA of the second moment of the same tokens, by the pipeline of
  :mod:`bpt_mm.whitening.collect` (:func:`~bpt_mm.whitening.collect.
  accumulate_tokens`, :func:`~bpt_mm.whitening.collect.solve_whitening`).

``Sigma`` is accumulated in float64 over every token of every image; the
distributions are measured on a seeded random subset of the tokens (at most
``max_values`` values per quantity) so ViT-B at 1024 px stays in memory. The
whitening check ``W Sigma W^T = I`` is exact algebra on the accumulated
``Sigma``, i.e. it is the second moment of the whitened ``X~`` over all the
tokens it was computed from.

The whitening here is the analysis' own, with the ``eps`` of its options
(:data:`DEFAULT_OPTIONS`: none, so that the whitened data really have an
identity second moment); the prompts' whitening in a model is whatever its
hook or checkpoint gave it.
"""
import math
from typing import Any, Dict, Iterable, List, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from bpt_mm.whitening.collect import (accumulate_tokens, block_product,
                                     block_token_rows, solve_whitening)
from bpt_mm.whitening.linalg import project_tokens
from bpt_mm.whitening.options import (NUM_IMAGES, SEED, WhiteningOptions,
                                      check_positive_int)
from bpt_mm.whitening.real_tokens import as_image_batch

from .burstiness import describe

__all__ = ['QUANTITIES', 'QUANTITY_LABELS', 'DEFAULT_EPS', 'DEFAULT_OPTIONS',
           'resolve_blocks', 'analyse_backbone']

#: Measured quantities, in the order of the plot panels.
QUANTITIES = ('x', 'qk_product', 'projected', 'whitened')
#: Their names in plots and tables.
QUANTITY_LABELS = {
    'x': 'X (tokens entering the block)',
    'qk_product': 'M = W_q^T W_k (entries)',
    'projected': 'X~ = M X^T',
    'whitened': 'whitened X~',
}
#: Relative regulariser of the analysis' ZCA (times the mean eigenvalue of
#: Sigma). None by default: ``W Sigma W^T`` is then the identity up to
#: float64 rounding (measured ~1e-5 at condition numbers of 5e13, which a
#: random ``W_q^T W_k`` already gives), where even a regulariser of 1e-12
#: visibly bends the weakest direction. A singular Sigma (fewer tokens than
#: channels) needs ``eps > 0``, and the error says so.
DEFAULT_EPS = 0.0
#: The analysis' options: the paper's token selection and statistic, with
#: :data:`DEFAULT_EPS`.
DEFAULT_OPTIONS = WhiteningOptions(eps=DEFAULT_EPS)


def resolve_blocks(backbone: Any, layers: Optional[Sequence[int]]
                   ) -> List[int]:
    """Blocks to analyse: ``layers`` (negative counts from the end) or, by
    default, the prompted blocks (block 0 for a model without prompts).

    Raises:
        ValueError: A layer is not an int in ``[-num_layers, num_layers)``;
            the message names ``--layers`` and the allowed range.
    """
    num = backbone.num_layers
    if layers is None or len(layers) == 0:
        prompted = sorted(backbone.prompt_modules())
        return prompted or [0]
    out = []
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int) \
                or not -num <= layer < num:
            raise ValueError(f'--layers: {layer!r} is not a block of this '
                             f'{num}-block ViT; allowed: 0 to {num - 1} (or '
                             f'-{num} to -1 from the end)')
        out.append(layer % num)
    return sorted(set(out))


def _kept_rows(rows: Tensor, keep: float, generator: torch.Generator
               ) -> Tensor:
    """A seeded random subset of about ``keep * len(rows)`` rows."""
    if keep >= 1:
        return rows
    count = max(1, int(round(keep * rows.shape[0])))
    index = torch.randperm(rows.shape[0], generator=generator)[:count]
    return rows[index.to(rows.device)]


def _subsample(values: np.ndarray, limit: int,
               rng: np.random.Generator) -> np.ndarray:
    if values.size <= limit:
        return values
    return rng.choice(values, size=limit, replace=False)


def analyse_backbone(backbone: Any,
                     batches: Iterable[Tensor],
                     blocks: Sequence[int],
                     num_images: int = NUM_IMAGES,
                     options: Optional[WhiteningOptions] = None,
                     max_values: int = 1_000_000,
                     seed: int = SEED,
                     fraction: float = 0.01) -> Dict[int, Dict[str, Any]]:
    """Burstiness statistics of ``blocks`` over the first ``num_images``.

    Args:
        backbone (PromptedViT): The backbone, run in eval mode without
            gradients (its mode is restored afterwards).
        batches (Iterable[Tensor | ImageBatch]): Preprocessed image batches
            ``(B, C, H, W)``, or :class:`~bpt_mm.whitening.real_tokens.
            ImageBatch`
            with each image's real size (padding patches are then left
            out); read until ``num_images`` images are seen.
        blocks (Sequence[int]): Block indices (see :func:`resolve_blocks`).
        num_images (int): Images to use. Defaults to 100 (the paper).
        options (WhiteningOptions, optional): Token selection (``tokens``,
            ``source``), ``product``, ``center`` and the ``eps`` of the
            analysis' ZCA; its ``statistic`` must be the paper's. Defaults
            to :data:`DEFAULT_OPTIONS` (no regulariser).
        max_values (int): At most this many values per quantity enter the
            distribution statistics (a seeded random subset of tokens, then
            of values for ``M``). Defaults to 10^6.
        seed (int): Seed of the subsets. Defaults to 0.
        fraction (float): Top fraction of the burstiness index. Defaults to
            0.01.

    Returns:
        dict[int, dict]: Per block: ``num_images``, ``num_tokens`` (all
        tokens in ``Sigma``), ``num_dropped_tokens`` (padding patches left
        out), ``num_tokens_sampled``, ``eps``,
        ``condition_number``, ``whitening_identity_error`` (``||W Sigma W^T
        - I||_F / ||I||_F``), ``whitening_identity_max_error`` (largest
        entry of ``|W Sigma W^T - I|``), ``stats`` ({quantity:
        :func:`bpt_mm.analysis.burstiness.describe`}), ``values``
        ({quantity: the float64 sample, for plots; not JSON}).

    Raises:
        ValueError: No image came out of ``batches``, or a bad argument.
    """
    options = DEFAULT_OPTIONS if options is None else options
    check_positive_int(num_images, '--num-images')
    check_positive_int(max_values, '--max-values')
    if options.statistic != 'paper':
        raise ValueError("the analysis uses the paper's statistic "
                         f"(Sigma = X~ X~^T / N), got statistic="
                         f'{options.statistic!r}')
    blocks = sorted(set(blocks))
    if not blocks:
        raise ValueError('no block to analyse')
    dim = backbone.embed_dims
    device = next(backbone.parameters()).device
    products = {i: block_product(backbone, i, options) for i in blocks}
    accs = {i: options.make_accumulator(dim, name=f'block {i}',
                                        device=device) for i in blocks}
    kept: Dict[int, List[Tensor]] = {i: [] for i in blocks}
    generator = torch.Generator().manual_seed(seed)
    keep = None
    seen = dropped = 0
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                if seen >= num_images:
                    break
                batch = as_image_batch(batch).first(
                    num_images - seen).to(device)
                x = batch.images
                # Real image tokens only: padding patches are left out.
                tokens, padding = block_token_rows(backbone, batch, blocks,
                                                   options)
                dropped += padding
                for i in blocks:
                    rows = tokens[i].to(torch.float64)
                    accumulate_tokens(accs[i], rows, products[i])
                    if keep is None:
                        # Tokens per image are known from the first batch;
                        # keep the same share of every batch.
                        expected = rows.shape[0] / x.shape[0] * num_images
                        keep = min(1.0, (max_values / dim) / expected)
                    kept[i].append(_kept_rows(rows, keep, generator).cpu())
                seen += x.shape[0]
    finally:
        backbone.train(was_training)
    if seen == 0:
        raise ValueError('the data gave no image to analyse')

    rng = np.random.default_rng(seed)
    results: Dict[int, Dict[str, Any]] = {}
    for i in blocks:
        try:
            solved = solve_whitening(accs[i], options, dtype=torch.float64)
        except ValueError as exc:
            raise ValueError(
                f'block {i}: cannot whiten X~ from {accs[i].num_tokens} '
                f'tokens ({exc}); use more images or a regulariser, e.g. '
                '--eps 1e-9') from exc
        sigma, whitening = solved['sigma'], solved['whitening']
        moment = whitening @ sigma @ whitening.T
        eye = torch.eye(dim, dtype=torch.float64)
        rows = torch.cat(kept[i])
        product = products[i].cpu()
        projected = project_tokens(rows, product)
        centred = projected - accs[i].mean().cpu() if options.center \
            else projected
        whitened = centred @ whitening.T
        values = {
            'x': rows.numpy().reshape(-1),
            'qk_product': _subsample(product.numpy().reshape(-1),
                                     max_values, rng),
            'projected': projected.numpy().reshape(-1),
            'whitened': whitened.numpy().reshape(-1),
        }
        results[i] = {
            'num_images': seen,
            'num_tokens': accs[i].num_tokens,
            'num_dropped_tokens': dropped,
            'num_tokens_sampled': int(rows.shape[0]),
            'eps': options.eps,
            'condition_number': solved['condition_number'],
            'whitening_identity_error': float(
                torch.linalg.norm(moment - eye) / math.sqrt(dim)),
            'whitening_identity_max_error': float(
                (moment - eye).abs().max()),
            'stats': {q: describe(values[q], fraction) for q in QUANTITIES},
            'values': values,
        }
    return results
