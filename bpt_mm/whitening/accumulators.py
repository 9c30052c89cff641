"""Streaming second moments of projected tokens, in float64 (torch only).

Both statistics keep raw sums (never a running mean), so they merge exactly
across batches, accumulators and ``torch.distributed`` processes. The
shared logic (merge, all-reduce, state dict, checks) is
:class:`TokenAccumulator`'s; the two statistics are small subclasses:

* :class:`SecondMomentAccumulator`: the paper's ``Sigma = X~ X~^T / N``;
* :class:`ImageAverageAccumulator`: the authors' code, which averages ``X~``
  over the images before forming the second moment.

:meth:`~bpt_mm.whitening.options.WhiteningOptions.make_accumulator` picks
one for the options' ``statistic``.
"""
import warnings
from typing import Any, Dict, List, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor

from .distributed import all_reduce_sum, comm_device, dist_ready
from .options import check_positive_int, label_prefix

__all__ = ['FewTokensWarning', 'RankDeficientWarning', 'TokenAccumulator',
           'SecondMomentAccumulator', 'ImageAverageAccumulator']


class FewTokensWarning(UserWarning):
    """The statistics have fewer independent tokens than channels.

    ``Sigma`` then has rank below ``d`` and its inverse square root is only
    defined through the regulariser, so the whitening of the missing
    directions is arbitrary (the paper asks for ``N >> d``).
    """


class RankDeficientWarning(FewTokensWarning):
    """``Sigma`` has an effective rank far below ``d`` although there may be
    enough tokens: the images carry little variation (e.g. all black), so
    ``eps`` rather than the data defines ``W`` in most directions."""


def as_float64_rows(tokens: Tensor, dim: int, name: Optional[str],
                     what: str) -> Tensor:
    """Validate tokens of shape ``(..., dim)`` and return them as float64."""
    if not isinstance(tokens, Tensor):
        raise ValueError(f'{label_prefix(name)}{what} must be a Tensor, got '
                         f'{type(tokens).__name__}')
    if tokens.dim() == 0 or tokens.shape[-1] != dim:
        raise ValueError(f'{label_prefix(name)}{what} must have last '
                         f'dimension {dim}, got shape {tuple(tokens.shape)}')
    if tokens.is_complex():
        raise ValueError(f'{label_prefix(name)}{what} must be real, got '
                         f'{tokens.dtype}')
    tokens = tokens.detach()
    if tokens.is_floating_point():
        # One NaN would silently poison every later block's whitening; it
        # is cheaper to stop here and say where it came from.
        bad = int((~torch.isfinite(tokens)).sum())
        if bad:
            raise ValueError(
                f'{label_prefix(name)}{what} has {bad} non-finite value(s) '
                f'out of {tokens.numel()} (shape {tuple(tokens.shape)}); '
                'check the backbone (fp16 overflow?) before computing '
                'whitening')
    return tokens.to(torch.float64)


class TokenAccumulator:
    """What both statistics share: a width ``d``, a label, a device, raw
    float64 sums (:attr:`_sums`, by state-dict key) and one count.

    Subclasses say what they count (:attr:`COUNT_KEY`) and how an update
    adds to the sums, and give :meth:`second_moment`; merging, summing over
    processes and the state dict work on the sums alike.

    Args:
        dim (int): Token width ``d``.
        name (str, optional): Label used in messages, e.g. ``'block 3'``.
        device (str | torch.device): Where the sums live. Defaults to
            ``'cpu'``.
    """

    #: State-dict key of :attr:`_count`.
    COUNT_KEY = 'count'

    def __init__(self, dim: int, name: Optional[str] = None,
                 device: Union[str, torch.device] = 'cpu') -> None:
        self._dim = check_positive_int(dim, 'dim')
        self.name = name
        self._device = torch.device(device)
        self._sums: Dict[str, Tensor] = {}
        self._count = 0

    @property
    def dim(self) -> int:
        """Token width ``d``."""
        return self._dim

    @property
    def device(self) -> torch.device:
        """Device of the sums."""
        return self._device

    @property
    def num_tokens(self) -> int:
        """Number of token rows accumulated (``N``)."""
        raise NotImplementedError

    def second_moment(self, center: bool = False) -> Tensor:
        """The statistic's ``Sigma`` (symmetric ``(d, d)`` float64)."""
        raise NotImplementedError

    def _rows(self, tokens: Tensor) -> Tensor:
        """``tokens`` checked and in float64 (see :func:`as_float64_rows`)."""
        return as_float64_rows(tokens, self._dim, self.name, 'update')

    def _adopt_layout(self, other: 'TokenAccumulator') -> bool:
        """Prepare to add ``other``'s sums; False when it has none."""
        return True

    def merge(self, other: 'TokenAccumulator') -> 'TokenAccumulator':
        """Add another accumulator's sums into this one.

        Args:
            other (TokenAccumulator): Same kind and ``dim``; left unchanged.

        Returns:
            TokenAccumulator: ``self``.
        """
        kind = type(self).__name__
        if type(other) is not type(self):
            raise ValueError(f'{label_prefix(self.name)}can only merge a '
                             f'{kind}, got {type(other).__name__}')
        if other.dim != self.dim:
            raise ValueError(f'{label_prefix(self.name)}cannot merge an '
                             f'accumulator of dim {other.dim} into one of '
                             f'dim {self.dim}')
        if not self._adopt_layout(other):
            return self
        for key, total in self._sums.items():
            total += other._sums[key].to(self._device)
        self._count += other._count
        return self

    def _agree_layout(self, group) -> bool:
        """Agree on the sums' shapes with the other processes (collective);
        False when no process has any sums."""
        return True

    def all_reduce(self, group: Optional[dist.ProcessGroup] = None
                   ) -> 'TokenAccumulator':
        """Sum the statistics over ``torch.distributed`` processes.

        Afterwards every process holds the statistics of all of them, so
        each computes the same ``W`` without a broadcast. A no-op when
        ``torch.distributed`` is not initialised. Every process must call
        it (it is a collective), and only once per accumulation: a second
        call would count the others' tokens again.

        Args:
            group (ProcessGroup, optional): Process group; default world.

        Returns:
            TokenAccumulator: ``self``.
        """
        if not dist_ready() or not self._agree_layout(group):
            return self
        # One flat float64 buffer -> one collective. Counts stay exact in
        # float64 up to 2**53.
        sums = list(self._sums.values())
        flat = torch.cat([s.reshape(-1) for s in sums] + [
            torch.tensor([float(self._count)], dtype=torch.float64,
                         device=self._device)])
        flat = all_reduce_sum(flat, group)
        offset = 0
        for total in sums:
            total.copy_(flat[offset:offset + total.numel()].reshape(
                total.shape))
            offset += total.numel()
        self._count = int(round(flat[-1].item()))
        return self

    def _state(self) -> Dict[str, Any]:
        """Entries of :meth:`state_dict` besides ``dim``, the count and the
        sums."""
        return {}

    def state_dict(self) -> Dict[str, Any]:
        """Sums and counts (copies), e.g. to save and reuse statistics."""
        state: Dict[str, Any] = {'dim': self._dim}
        state.update(self._state())
        state[self.COUNT_KEY] = self._count
        state.update({k: v.clone() for k, v in self._sums.items()})
        return state

    def _required_keys(self) -> List[str]:
        return ['dim', self.COUNT_KEY]

    def _load_layout(self, state: Dict[str, Any]) -> None:
        """Shape the sums for ``state`` (checked to have the keys)."""

    def load_state_dict(self, state: Dict[str, Any]) -> 'TokenAccumulator':
        """Restore :meth:`state_dict` output (``dim`` must match).

        Returns:
            TokenAccumulator: ``self``.
        """
        missing = set(self._required_keys()) - set(state)
        if missing:
            raise ValueError(f'{label_prefix(self.name)}state_dict lacks '
                             f'{sorted(missing)}')
        if state['dim'] == self._dim:
            self._load_layout(state)
        if state['dim'] != self._dim or any(
                tuple(state[k].shape) != tuple(v.shape)
                for k, v in self._sums.items()):
            raise ValueError(f'{label_prefix(self.name)}state_dict is for dim '
                             f'{state["dim"]}, this accumulator has dim '
                             f'{self._dim}')
        for key, total in self._sums.items():
            total.copy_(state[key])
        self._count = int(state[self.COUNT_KEY])
        return self

    def _repr_fields(self) -> str:
        return f'{self.COUNT_KEY}={self._count}'

    def __repr__(self) -> str:
        return (f'{type(self).__name__}(dim={self._dim}, name={self.name!r},'
                f' {self._repr_fields()})')


class SecondMomentAccumulator(TokenAccumulator):
    """Streams ``sum x x^T``, ``sum x`` and the count of token rows.

    The accumulator takes *projected* tokens (rows of ``X~^T``, see
    :func:`~bpt_mm.whitening.linalg.project_tokens`) and gives the paper's
    ``Sigma = X~ X~^T / N``.
    Raw sums (not a running mean) are kept in float64 because sums merge
    exactly across batches, accumulators and processes; float64 keeps the
    ``~10^4`` rank-one updates of ViT tokens, whose channels span orders of
    magnitude, from losing the small eigenvalues that whitening amplifies.

    Args:
        dim (int): Token width ``d``.
        name (str, optional): Label used in messages, e.g. ``'block 3'``.
        device (str | torch.device): Where the sums live; tokens are moved
            there. Defaults to ``'cpu'``.

    Examples:
        >>> import torch
        >>> acc = SecondMomentAccumulator(4, name='block 0')
        >>> x = torch.randn(2, 100, 4)
        >>> for batch in x:
        ...     _ = acc.update(batch)  # update returns the accumulator
        >>> acc.num_tokens
        200
        >>> sigma = acc.second_moment()
        >>> rows = x.reshape(-1, 4).double()
        >>> torch.allclose(sigma, rows.T @ rows / 200)
        True
    """

    COUNT_KEY = 'num_tokens'

    def __init__(self, dim: int, name: Optional[str] = None,
                 device: Union[str, torch.device] = 'cpu') -> None:
        super().__init__(dim, name, device)
        self._sums['outer'] = torch.zeros(dim, dim, dtype=torch.float64,
                                          device=self._device)
        self._sums['sum'] = torch.zeros(dim, dtype=torch.float64,
                                        device=self._device)

    @property
    def num_tokens(self) -> int:
        """Number of token rows accumulated (``N``)."""
        return self._count

    def update(self, tokens: Tensor) -> 'SecondMomentAccumulator':
        """Add projected tokens.

        Args:
            tokens (Tensor): Shape ``(..., d)``; leading dimensions (batch,
                tokens) are flattened. Any real dtype; accumulated in
                float64.

        Returns:
            SecondMomentAccumulator: ``self``.
        """
        rows = self._rows(tokens).reshape(-1, self._dim).to(self._device)
        self._sums['outer'] += rows.T @ rows
        self._sums['sum'] += rows.sum(0)
        self._count += rows.shape[0]
        return self

    def _required_keys(self) -> List[str]:
        return super()._required_keys() + ['outer', 'sum']

    def second_moment(self, center: bool = False) -> Tensor:
        """``Sigma = sum x x^T / N`` (or the covariance when centring).

        Args:
            center (bool): Subtract the mean: ``sum x x^T / N - mu mu^T``
                (the population covariance). The paper does not centre.
                Defaults to False.

        Returns:
            Tensor: Symmetric ``(d, d)`` float64 matrix on :attr:`device`.

        Raises:
            RuntimeError: No tokens were accumulated.

        Warns:
            FewTokensWarning: ``N < d``, so the matrix is rank deficient.
        """
        if self._count == 0:
            raise RuntimeError(f'{label_prefix(self.name)}no tokens '
                               'accumulated; call update() before '
                               'second_moment()')
        if self._count < self._dim:
            warnings.warn(
                f'{label_prefix(self.name)}only {self._count} tokens for d='
                f'{self._dim} channels: the second moment has rank < d and '
                'its whitening is set by eps alone in the missing '
                'directions; use more images', FewTokensWarning,
                stacklevel=2)
        sigma = self._sums['outer'] / self._count
        if center:
            # One-pass centring; in float64 the cancellation costs
            # log10(|mu|^2 / var) of ~16 digits, acceptable for tokens.
            mean = self._sums['sum'] / self._count
            sigma = sigma - torch.outer(mean, mean)
        # x^T x from a BLAS gemm is not bitwise symmetric.
        return (sigma + sigma.T) / 2

    def mean(self) -> Tensor:
        """Mean projected token (float64, shape ``(d,)``)."""
        if self._count == 0:
            raise RuntimeError(f'{label_prefix(self.name)}no tokens '
                               'accumulated')
        return self._sums['sum'] / self._count


class ImageAverageAccumulator(TokenAccumulator):
    """The authors' statistic: average ``X~`` over images, then ``/ d``.

    The authors' code stacks each image's projected tokens as a ``d x n``
    matrix, averages those matrices over the images, and forms
    ``Sigma = X~_avg X~_avg^T / d`` (it divides by ``d``, the size of the
    averaged matrix's first dimension, not by ``n``). This accumulator keeps
    the running sum of the per-image ``n x d`` token matrices, so it needs
    the same token count ``n`` in every image. ``Sigma`` has rank ``<= n``
    (197 < 768 for ViT-B at 224 px with CLS), which is why this statistic
    cannot be whitened without a regulariser.

    Args:
        dim (int): Token width ``d``.
        tokens_per_image (int, optional): ``n``; taken from the first update
            when None.
        name (str, optional): Label used in messages, e.g. ``'block 3'``.
        device (str | torch.device): Where the sums live. Defaults to
            ``'cpu'``.

    Examples:
        >>> import torch
        >>> acc = ImageAverageAccumulator(4)
        >>> x = torch.randn(3, 5, 4, dtype=torch.float64)  # 3 images, 5 tokens
        >>> _ = acc.update(x)
        >>> avg = x.mean(0).T                             # d x n
        >>> torch.allclose(acc.second_moment(), avg @ avg.T / 4)
        True
    """

    COUNT_KEY = 'num_images'

    def __init__(self, dim: int, tokens_per_image: Optional[int] = None,
                 name: Optional[str] = None,
                 device: Union[str, torch.device] = 'cpu') -> None:
        super().__init__(dim, name, device)
        if tokens_per_image is not None:
            self._alloc(check_positive_int(tokens_per_image,
                                           'tokens_per_image'))

    def _alloc(self, n: int) -> None:
        self._sums['image_sum'] = torch.zeros(
            n, self._dim, dtype=torch.float64, device=self._device)

    @property
    def tokens_per_image(self) -> Optional[int]:
        """``n``, or None before the first update."""
        image_sum = self._sums.get('image_sum')
        return None if image_sum is None else image_sum.shape[0]

    @property
    def num_images(self) -> int:
        """Number of images accumulated."""
        return self._count

    @property
    def num_tokens(self) -> int:
        """Number of token rows accumulated (images x ``n``)."""
        return self._count * (self.tokens_per_image or 0)

    def update(self, tokens: Tensor) -> 'ImageAverageAccumulator':
        """Add the projected tokens of a batch of images.

        Args:
            tokens (Tensor): ``(B, n, d)`` for ``B`` images, or ``(n, d)``
                for one image; ``n`` must be the same in every update.

        Returns:
            ImageAverageAccumulator: ``self``.
        """
        rows = self._rows(tokens)
        if rows.dim() == 2:
            rows = rows.unsqueeze(0)
        if rows.dim() != 3:
            raise ValueError(f'{label_prefix(self.name)}update must be '
                             '(B, n, d) or (n, d) for the image-average '
                             f'statistic, got shape {tuple(tokens.shape)}')
        n = rows.shape[1]
        if self.tokens_per_image is None:
            self._alloc(check_positive_int(n, 'tokens per image'))
        elif n != self.tokens_per_image:
            raise ValueError(f'{label_prefix(self.name)}the image-average '
                             'statistic needs the same number of tokens in '
                             f'every image: had {self.tokens_per_image}, got '
                             f'{n} (resize images to one size)')
        self._sums['image_sum'] += rows.sum(0).to(self._device)
        self._count += rows.shape[0]
        return self

    def _adopt_layout(self, other: 'TokenAccumulator') -> bool:
        theirs = other.tokens_per_image
        if theirs is None:
            return False
        if self.tokens_per_image is None:
            self._alloc(theirs)
        elif theirs != self.tokens_per_image:
            raise ValueError(f'{label_prefix(self.name)}cannot merge '
                             f'{theirs} tokens per image into '
                             f'{self.tokens_per_image}')
        return True

    def _agree_layout(self, group) -> bool:
        # Agree on n first; every rank sees the same max/min, so a mismatch
        # raises on all of them instead of hanging in the next collective.
        # A process that saw no image learns n from the others.
        mine = self.tokens_per_image or 0
        dev = comm_device(group)
        hi = torch.tensor([mine], dtype=torch.int64, device=dev)
        lo = torch.tensor([mine if mine else 2**62], dtype=torch.int64,
                          device=dev)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=group)
        dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=group)
        n_max, n_min = int(hi.item()), int(lo.item())
        if n_max == 0:
            return False
        if n_min != n_max:
            raise ValueError(f'{label_prefix(self.name)}processes saw '
                             f'different tokens per image ({n_min} vs '
                             f'{n_max})')
        if self.tokens_per_image is None:
            self._alloc(n_max)
        return True

    def second_moment(self, center: bool = False) -> Tensor:
        """``X~_avg X~_avg^T / d`` as in the authors' code.

        Args:
            center (bool): Not defined for this statistic (the authors do
                not centre); must be False.

        Returns:
            Tensor: Symmetric ``(d, d)`` float64 matrix.

        Raises:
            RuntimeError: No image was accumulated.

        Warns:
            FewTokensWarning: ``n < d``, so the matrix is rank deficient.
        """
        if center:
            raise ValueError('`center`=True is not defined for the authors\''
                             ' image-average statistic')
        if self._count == 0:
            raise RuntimeError(f'{label_prefix(self.name)}no images '
                               'accumulated; call update() before '
                               'second_moment()')
        n = self.tokens_per_image
        if n < self._dim:
            warnings.warn(
                f'{label_prefix(self.name)}the image-average statistic has '
                f'rank <= {n} tokens per image < d={self._dim}: its '
                'whitening is set by eps alone in the missing directions',
                FewTokensWarning, stacklevel=2)
        avg = self._sums['image_sum'] / self._count  # n x d, i.e. X~_avg^T
        sigma = avg.T @ avg / self._dim
        return (sigma + sigma.T) / 2

    def _state(self) -> Dict[str, Any]:
        return {'tokens_per_image': self.tokens_per_image,
                'image_sum': None}

    def _required_keys(self) -> List[str]:
        return super()._required_keys() + ['tokens_per_image', 'image_sum']

    def _load_layout(self, state: Dict[str, Any]) -> None:
        if state['tokens_per_image'] is None:
            self._sums.pop('image_sum', None)
        else:
            self._alloc(int(state['tokens_per_image']))

    def _repr_fields(self) -> str:
        return (f'tokens_per_image={self.tokens_per_image}, '
                f'num_images={self._count}')
