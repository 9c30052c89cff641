"""Prototypes of a token set: the initial values of SPT prompts (torch only).

SPT ("Revisiting the Power of Prompt for Visual Tuning", ICML 2024, the
BPT authors' earlier work) initialises ``m`` prompts from the downstream
data's own tokens. Given the tokens ``X`` (N x d) collected from training
images, :func:`compute_prototypes` returns ``m`` rows by one of:

* ``'sample'``: ``m`` distinct rows of ``X`` drawn uniformly (the authors'
  default, ``prompt_sample_type='random'``); a row that equals one drawn
  already is passed over, so repeated tokens never give repeated prompts;
* ``'kmeans'``: the ``m`` centres of k-means (k-means++ seeding, Lloyd
  iterations, float64 distances);
* ``'mean_pool'`` / ``'max_pool'``: the rows of ``X`` split into ``m``
  random groups of (almost) equal size, each group averaged / maximised
  channel by channel. (The authors name pooling as an alternative without
  saying over what; this grouping is bpt_mm's reading.)

The ``m`` prototypes must all differ: two equal prompts are one prompt
counted twice. ``'sample'`` and ``'kmeans'`` can only give ``m`` different
rows when ``X`` holds at least ``m`` distinct rows, so fewer (uniform
images, say) are refused before anything is computed; the pooled inits can
still give ``m`` different rows from fewer distinct tokens (groups of other
mixtures), so for them, as for every init, the result itself is checked and
refused when two prototypes are equal (e.g. every token the same).

Every draw uses a ``torch.Generator`` seeded by the caller, so the result is
a function of the token set and the seed. Memory is bounded by a
:class:`TokenReservoir`, a uniform random sample of at most ``capacity``
rows of everything it was given (Algorithm R). Before the prototypes are
computed the rows are put in a canonical order (:func:`canonical_rows`), so
while nothing was dropped the prototypes depend neither on the order of the
images nor on how they were split over processes.
"""
import math

import torch
from torch import Tensor

from bpt_mm.choices import check_choice
from bpt_mm.models.prompts import PROTOTYPE_INITS
from .options import SEED, check_positive_int

__all__ = ['PROTOTYPE_TOKENS', 'KMEANS_ITERS', 'TokenReservoir',
           'canonical_rows', 'sample_prototypes', 'kmeans_prototypes',
           'pooled_prototypes', 'compute_prototypes', 'per_rank_capacity']

#: Most token rows kept per block for the prototypes, over all processes
#: (61 MB at d = 768).
PROTOTYPE_TOKENS = 20000
#: Most Lloyd iterations of ``init='kmeans'``.
KMEANS_ITERS = 50


class TokenReservoir:
    """A uniform random sample of at most ``capacity`` token rows.

    Rows are kept as they come until ``capacity`` is reached; after that the
    ``t``-th row (0-based) replaces a random slot with probability
    ``capacity / (t + 1)`` (Algorithm R), so at any time every row seen so
    far is held with the same probability. The draws come from a generator
    seeded with ``seed``: the same rows in the same order give the same
    sample. Rows are stored in float32 on the CPU.

    Args:
        capacity (int): Most rows held.
        dim (int): Row width ``d``.
        seed (int): Seed of the replacement draws.
        name (str): What the rows are, for error messages.
    """

    def __init__(self, capacity: int, dim: int, seed: int = SEED,
                 name: str = 'tokens') -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) \
                or capacity < 1:
            raise ValueError(f'reservoir `capacity` must be a positive int, '
                             f'got {capacity!r}')
        self.capacity = capacity
        self.dim = dim
        self.name = name
        self.num_seen = 0
        self._rows = torch.empty(0, dim, dtype=torch.float32)
        self._generator = torch.Generator().manual_seed(seed)

    @property
    def rows(self) -> Tensor:
        """The rows held, ``(min(num_seen, capacity), d)``."""
        return self._rows

    def update(self, tokens: Tensor) -> None:
        """Offer the rows of ``tokens`` (``(..., d)``), in order."""
        if tokens.shape[-1] != self.dim:
            raise ValueError(f'{self.name}: rows must have {self.dim} '
                             f'channels, got shape {tuple(tokens.shape)}')
        rows = tokens.detach().reshape(-1, self.dim).to('cpu', torch.float32)
        if not bool(torch.isfinite(rows).all()):
            raise ValueError(f'{self.name}: non-finite token values (check '
                             'the images and the backbone weights)')
        free = self.capacity - self._rows.shape[0]
        if free > 0:
            self._rows = torch.cat([self._rows, rows[:free]])
            self.num_seen += min(free, rows.shape[0])
            rows = rows[free:]
        if rows.shape[0] == 0:
            return
        # Row t (0-based over all rows seen) draws a slot in [0, t]; it is
        # kept if the slot is a real one.
        index = torch.arange(self.num_seen, self.num_seen + rows.shape[0],
                             dtype=torch.float64)
        draws = torch.rand(rows.shape[0], generator=self._generator,
                           dtype=torch.float64)
        slots = torch.floor(draws * (index + 1)).to(torch.int64)
        self.num_seen += rows.shape[0]
        chosen = (slots < self.capacity).nonzero().squeeze(1)
        slots = slots[chosen]
        # Two rows of one call may draw the same slot: the later one wins,
        # as in the one-row-at-a-time algorithm.
        order = torch.arange(slots.shape[0])
        last = torch.full((self.capacity, ), -1, dtype=torch.int64)
        last.scatter_reduce_(0, slots, order, reduce='amax')
        keep = last[slots] == order
        self._rows[slots[keep]] = rows[chosen[keep]]


def canonical_rows(rows: Tensor) -> Tensor:
    """``rows`` sorted lexicographically (duplicates kept).

    The prototypes are computed from this order, so they do not depend on
    the order in which the rows were gathered.
    """
    if rows.shape[0] < 2:
        return rows
    unique, counts = torch.unique(rows, dim=0, sorted=True,
                                  return_counts=True)
    return unique.repeat_interleave(counts, dim=0)


#: Why the token rows are all the same, most likely.
_UNIFORM = ' (every token the same: uniform images?)'


def _check_enough(rows: Tensor, num: int, what: str) -> None:
    if rows.shape[0] < num:
        raise ValueError(f'{what}: {num} prototypes need at least {num} '
                         f'tokens, got {rows.shape[0]}; use more images '
                         '(`num_images`) or fewer prompts (`num_tokens`)')


def sample_prototypes(rows: Tensor, num: int,
                      generator: torch.Generator) -> Tensor:
    """``num`` distinct rows of ``rows`` drawn uniformly without replacement,
    a row equal to one drawn already passed over.

    Args:
        rows (Tensor): Tokens ``(N, d)`` holding at least ``num`` distinct
            rows.
        num (int): Prototypes ``m``.
        generator (torch.Generator): Source of the draw (CPU).

    Returns:
        Tensor: ``(num, d)``, in the dtype of ``rows``.
    """
    _check_enough(rows, num, 'sample')
    order = torch.randperm(rows.shape[0], generator=generator)
    # Walk the shuffled rows and keep the first of each distinct value: a
    # uniform draw without replacement that passes over repeats (with all
    # rows distinct, the first ``num`` of the shuffle).
    _, value = torch.unique(rows.cpu(), dim=0, return_inverse=True)
    first = torch.full((int(value.max()) + 1, ), rows.shape[0],
                       dtype=torch.int64)
    first.scatter_reduce_(0, value[order], torch.arange(rows.shape[0]),
                          reduce='amin')
    if first.shape[0] < num:
        raise ValueError(f'sample: {num} distinct rows asked, the rows hold '
                         f'{first.shape[0]}')
    pick = order[first.sort().values[:num]]
    return rows[pick.to(rows.device)].clone()


def _squared_distances(points: Tensor, centres: Tensor,
                       point_norms: Tensor) -> Tensor:
    """``|x - c|^2`` for every pair (``point_norms`` = ``|x|^2``), never
    below 0. A single centre goes through a matrix-vector product, which
    is ~20x faster than a one-column matrix product here."""
    if centres.shape[0] == 1:
        cross = torch.mv(points, centres[0]).unsqueeze(1)
    else:
        cross = points @ centres.t()
    d2 = point_norms.unsqueeze(1) - 2 * cross + centres.pow(2).sum(1)
    return d2.clamp_min_(0)


def kmeans_prototypes(rows: Tensor, num: int, generator: torch.Generator,
                      max_iters: int = KMEANS_ITERS) -> Tensor:
    """The ``num`` centres of k-means on ``rows`` (float64 throughout).

    Seeding is k-means++ (each new centre drawn with probability
    proportional to the squared distance to the nearest chosen one), then
    Lloyd iterations until no assignment changes or ``max_iters``. A cluster
    that loses all its points is given the point farthest from its centre,
    so exactly ``num`` centres come back.

    Args:
        rows (Tensor): Tokens ``(N, d)``, ``N >= num``.
        num (int): Clusters ``m``.
        generator (torch.Generator): Source of the seeding draws (CPU).
        max_iters (int): Most Lloyd iterations. Defaults to 50.

    Returns:
        Tensor: ``(num, d)`` float64 centres.
    """
    _check_enough(rows, num, 'kmeans')
    points = rows.to(torch.float64)
    n = points.shape[0]
    first = int(torch.randint(n, (1, ), generator=generator))
    norms = points.pow(2).sum(1)
    centres = points[first:first + 1]
    nearest = _squared_distances(points, centres, norms).squeeze(1)
    for _ in range(1, num):
        total = float(nearest.sum())
        if total > 0:
            weights = nearest / total
            pick = int(torch.multinomial(weights.cpu(), 1,
                                         generator=generator))
        else:  # every point sits on a centre: any point not chosen yet
            pick = int(torch.randint(n, (1, ), generator=generator))
        centres = torch.cat([centres, points[pick:pick + 1]])
        nearest = torch.minimum(
            nearest,
            _squared_distances(points, centres[-1:], norms).squeeze(1))
    assign = None
    for _ in range(max_iters):
        d2 = _squared_distances(points, centres, norms)
        new_assign = d2.argmin(1)
        if assign is not None and torch.equal(new_assign, assign):
            break
        assign = new_assign
        counts = torch.bincount(assign, minlength=num)
        sums = torch.zeros_like(centres).index_add_(0, assign, points)
        empties = (counts == 0).nonzero().squeeze(1).tolist()
        if empties:
            own = d2[torch.arange(n), assign]
        for empty in empties:
            # never take the last point of a cluster, nor one moved already
            own[counts[assign] <= 1] = -math.inf
            far = int(own.argmax())
            own[far] = -math.inf
            sums[empty], counts[empty] = points[far], 1
            counts[assign[far]] -= 1
            sums[assign[far]] -= points[far]
            assign[far] = empty
        centres = sums / counts.unsqueeze(1).to(sums.dtype)
    return centres


def pooled_prototypes(rows: Tensor, num: int, generator: torch.Generator,
                      mode: str = 'mean') -> Tensor:
    """Rows split into ``num`` random groups, each mean- or max-pooled.

    The rows are shuffled with ``generator`` and cut into ``num``
    contiguous groups whose sizes differ by at most one.

    Args:
        rows (Tensor): Tokens ``(N, d)``, ``N >= num``.
        num (int): Prototypes ``m``.
        generator (torch.Generator): Source of the shuffle (CPU).
        mode (str): ``'mean'`` or ``'max'``.

    Returns:
        Tensor: ``(num, d)``, in the dtype of ``rows``.
    """
    if mode not in ('mean', 'max'):
        raise ValueError(f"pooling `mode` must be 'mean' or 'max', got "
                         f'{mode!r}')
    _check_enough(rows, num, f'{mode}_pool')
    shuffled = rows[torch.randperm(rows.shape[0],
                                   generator=generator).to(rows.device)]
    groups = torch.tensor_split(shuffled, num)
    if mode == 'mean':
        return torch.stack([g.to(torch.float64).mean(0) for g in groups]
                           ).to(rows.dtype)
    return torch.stack([g.amax(0) for g in groups])


def _num_distinct(sorted_rows: Tensor) -> int:
    """Distinct rows of lexicographically sorted ``sorted_rows``."""
    if sorted_rows.shape[0] < 2:
        return sorted_rows.shape[0]
    changes = (sorted_rows[1:] != sorted_rows[:-1]).any(1)
    return 1 + int(changes.sum())


def compute_prototypes(rows: Tensor, num: int, init: str, seed: int,
                       kmeans_iters: int = KMEANS_ITERS,
                       name: str = 'tokens'
                       ) -> Tensor:
    """``num`` prototypes of ``rows`` by ``init`` (see the module docstring).

    The rows are first put in :func:`canonical_rows` order; the draws come
    from a CPU generator seeded with ``seed``. The ``num`` prototypes all
    differ, or a ValueError says why not (the one home of that rule).

    Args:
        rows (Tensor): Tokens ``(N, d)``.
        num (int): Prototypes ``m`` (the prompt's ``num_tokens``).
        init (str): One of
            :data:`~bpt_mm.models.prompts.PROTOTYPE_INITS` (an SPT prompt's
            ``init``, checked by its options).
        seed (int): Seed of the draws.
        kmeans_iters (int): Most Lloyd iterations of ``'kmeans'``.
        name (str): Where the rows come from (e.g. ``'block 3'``), for the
            messages.

    Returns:
        Tensor: ``(num, d)`` float32 on the CPU.

    Examples:
        >>> rows = torch.cat([torch.zeros(5, 2), torch.ones(5, 2)])
        >>> compute_prototypes(rows, 2, 'kmeans', seed=0).sum(1).sort().values
        tensor([0., 2.])
    """
    check_choice(init, PROTOTYPE_INITS, 'init')
    check_positive_int(kmeans_iters, 'kmeans_iters')
    rows = rows.detach().cpu()
    # NaN/Inf rows: 'sample' may pass over them unseen, 'kmeans' fails in
    # torch with a message that names nothing; say where they came from.
    bad = int((~torch.isfinite(rows)).sum())
    if bad:
        raise ValueError(
            f'{name}: the token rows have {bad} non-finite value(s) out of '
            f'{rows.numel()} (shape {tuple(rows.shape)}); check the images '
            'and the backbone weights (fp16 overflow?) before computing '
            'SPT prototypes')
    rows = canonical_rows(rows)
    distinct = _num_distinct(rows)
    # (fewer rows than prompts: each init's own count check says so)
    if init in ('sample', 'kmeans') and distinct < num <= rows.shape[0]:
        raise ValueError(
            f'{name}: {num} SPT prototypes by init={init!r} would repeat '
            f'rows: the {rows.shape[0]} token rows hold only {distinct} '
            f'distinct one(s), fewer than `prompt.num_tokens`={num}'
            f'{_UNIFORM if distinct == 1 else ""}. Use more or other images '
            '(`num_images`), fewer prompts (`prompt.num_tokens`)'
            + (" or init='mean_pool' (groups of tokens averaged)"
               if distinct > 1 else ''))
    generator = torch.Generator().manual_seed(seed)
    if init == 'sample':
        out = sample_prototypes(rows, num, generator)
    elif init == 'kmeans':
        out = kmeans_prototypes(rows, num, generator, kmeans_iters)
    else:
        out = pooled_prototypes(rows, num, generator,
                                mode=init[:-len('_pool')])
    out = out.to(torch.float32)
    if not bool(torch.isfinite(out).all()):  # pragma: no cover (guard)
        raise ValueError(f'{name}: {init} prototypes are not finite')
    different = _num_distinct(canonical_rows(out))
    if different < num:
        raise ValueError(
            f'{name}: init={init!r} gave only {different} different SPT '
            f'prototype(s) of `prompt.num_tokens`={num} (the '
            f'{rows.shape[0]} token rows hold {distinct} distinct one(s)'
            f'{_UNIFORM if distinct == 1 else ""}). Use more or other images '
            '(`num_images`) or fewer prompts (`prompt.num_tokens`)')
    return out


def per_rank_capacity(total: int, world_size: int) -> int:
    """Rows each of ``world_size`` processes keeps so that the gathered set
    holds at most about ``total`` rows."""
    return max(1, math.ceil(total / world_size))
