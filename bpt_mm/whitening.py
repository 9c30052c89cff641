"""Whitening statistics for BPT (pure torch).

BPT learns prompts in a whitened space. For one ViT block whose attention has
the weight ``qkv.weight`` of shape ``(3d, d)`` (PyTorch's out x in layout; rows
``0:d`` are ``W_q`` and rows ``d:2d`` are ``W_k``) the logit between a prompt
``u`` and a patch token ``v`` (row vectors, biases and scale aside) is

.. math::  u W_q^T W_k v^T = u M v^T, \\qquad M = W_q^T W_k .

A prompt's logits are therefore linear in the *projected* tokens
``X~ = M X^T`` (``d x N`` for ``N`` patch tokens ``X``), whose entries are
bursty. The paper whitens them with ZCA::

    Sigma = X~ X~^T / N,   W = Sigma^{-1/2} = U (S + reg)^{-1/2} U^T.

This module gives the pieces, none of which needs mmengine or a model:

* :func:`query_key_product` builds ``M`` (or the authors' variant) from a
  block's ``qkv.weight``;
* :func:`project_tokens` turns ``(..., d)`` tokens into the rows of ``X~^T``;
* :class:`SecondMomentAccumulator` streams ``Sigma`` in float64 over batches
  and processes (the paper's statistic);
* :class:`ImageAverageAccumulator` reproduces the authors' code, which
  averages ``X~`` over the images before forming the second moment;
* :func:`zca_whitening_matrix` and :func:`condition_number` turn ``Sigma``
  into ``W`` with a regulariser relative to the spectrum;
* :class:`WhiteningStatistics` holds the options a researcher may vary and
  :func:`whitening_from_tokens` runs the whole chain for tests and tools;
* :func:`whitened_bilinear_basis` builds ``B = W C`` for BPT-bilinear.

Row-vector convention throughout: tokens are rows, so ``X~^T = X M^T`` and the
whitened rows of ``X~^T`` are ``X~^T W^T`` (``= X~^T W``, ``W`` is symmetric).
"""
import math
import warnings
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Optional, Tuple, Union

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    'FewTokensWarning', 'RankDeficientWarning', 'effective_rank',
    'query_key_product', 'project_tokens',
    'SecondMomentAccumulator', 'ImageAverageAccumulator',
    'zca_whitening_matrix', 'condition_number', 'WhiteningStatistics',
    'whitening_from_tokens', 'whitened_bilinear_basis'
]

QK_ORDERS = ('qk', 'kq', 'authors', 'authors_mae')
TOKEN_SETS = ('patch', 'all')
TOKEN_SOURCES = ('block_input', 'norm1')
STATISTICS = ('paper', 'authors')
BASIS_MODES = ('random', 'eigen', 'identity')


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


def _prefix(name: Optional[str]) -> str:
    # Error messages start with the block label so that a failure among
    # twelve blocks says which one it was.
    return f'{name}: ' if name else ''


def _check_choice(value: Any, allowed: Tuple[str, ...], arg: str) -> str:
    if value not in allowed:
        raise ValueError(f'`{arg}` must be one of {allowed}, got {value!r}')
    return value


def _check_int(value: Any, arg: str, minimum: int = 1) -> int:
    # bool is an int subclass; dim=True is a typo, not 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f'`{arg}` must be an int >= {minimum}, '
                         f'got {value!r} ({type(value).__name__})')
    if value < minimum:
        raise ValueError(f'`{arg}` must be an int >= {minimum}, got {value}')
    return value


def _check_eps(eps: Any) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) \
            or not math.isfinite(eps) or eps < 0:
        raise ValueError(f'`eps` must be a finite float >= 0, got {eps!r}')
    return float(eps)


# ---------------------------------------------------------------------------
# The query-key product
# ---------------------------------------------------------------------------
def query_key_product(qkv_weight: Tensor,
                      num_heads: Optional[int] = None,
                      order: str = 'qk') -> Tensor:
    """The ``d x d`` query-key product of a fused ``qkv`` weight.

    Summed over heads, the attention logit between row vectors ``u`` (the
    query side) and ``v`` (the key side) is ``u W_q^T W_k v^T``: the heads
    split the *output* rows of ``W_q`` and ``W_k``, so the per-head products
    add up to the full one and ``M`` does not depend on the number of heads.

    Args:
        qkv_weight (Tensor): ``attn.qkv.weight`` of shape ``(3d, d)`` in
            PyTorch's out x in layout (q, k, v stacked along dim 0, as in
            timm and mmpretrain).
        num_heads (int, optional): Only checked to divide ``d`` (it cannot
            change the product, see above); pass it to catch a weight that
            belongs to another architecture. Defaults to None.
        order (str): Which product. ``'qk'`` (default): ``M = W_q^T W_k``,
            the product of the logit with the prompt as the query (the
            paper's ``X~ = M X^T``). ``'kq'``: ``M^T = W_k^T W_q``, the
            product with the prompt as the key, i.e. as patches see it.
            ``'authors'``: ``W_q W_k^T`` as the authors' code forms it from
            the out x in weights; it is a product over the *input* channels
            and in general equals neither of the others. ``'authors_mae'``:
            ``W_q W_q^T``, what the authors' MAE shallow model file whitens
            with (it loads the query weights for the key as well), to
            reproduce their MAE numbers; symmetric, and it ignores ``W_k``.

    Returns:
        Tensor: The ``(d, d)`` product, in ``qkv_weight``'s dtype and device
        (formed in float64 so that float32 weights lose nothing extra).

    Examples:
        >>> import torch
        >>> w = torch.randn(3 * 8, 8, dtype=torch.float64)
        >>> m = query_key_product(w, num_heads=2)
        >>> u, v = torch.randn(2, 8, dtype=torch.float64)
        >>> q, k = w[:8] @ u, w[8:16] @ v  # query of u, key of v
        >>> torch.allclose(u @ m @ v, q @ k)
        True
    """
    if not isinstance(qkv_weight, Tensor) or qkv_weight.dim() != 2 \
            or qkv_weight.shape[0] != 3 * qkv_weight.shape[1] \
            or qkv_weight.shape[1] == 0:
        shape = tuple(qkv_weight.shape) if isinstance(qkv_weight, Tensor) \
            else type(qkv_weight).__name__
        raise ValueError('`qkv_weight` must be a (3d, d) tensor (out x in, '
                         f'q/k/v stacked along dim 0), got {shape}')
    _check_choice(order, QK_ORDERS, 'order')
    dim = qkv_weight.shape[1]
    if num_heads is not None:
        _check_int(num_heads, 'num_heads')
        if dim % num_heads:
            raise ValueError(f'`num_heads`={num_heads} does not divide the '
                             f'width d={dim} of `qkv_weight`')
    w = qkv_weight.detach().to(torch.float64)
    w_q, w_k = w[:dim], w[dim:2 * dim]
    if order == 'qk':
        product = w_q.T @ w_k
    elif order == 'kq':
        # Transposing the 'qk' product (rather than forming W_k^T W_q) makes
        # the two orders exact transposes of each other, bit for bit.
        product = (w_q.T @ w_k).T
    elif order == 'authors':
        product = w_q @ w_k.T
    else:  # 'authors_mae': their MAE shallow file has W_k := W_q
        product = w_q @ w_q.T
    return product.to(qkv_weight.dtype)


def project_tokens(tokens: Tensor, product: Tensor) -> Tensor:
    """Rows of ``X~^T``: tokens ``X`` mapped by the query-key product.

    ``X~ = M X^T`` holds one projected token per column; with tokens as rows
    the same values are ``X M^T``, which keeps the leading dimensions.

    Args:
        tokens (Tensor): Tokens of shape ``(..., d)``.
        product (Tensor): ``M`` of shape ``(d, d)``, e.g. from
            :func:`query_key_product`.

    Returns:
        Tensor: Projected tokens of shape ``(..., d)`` in the promoted dtype
        of the inputs.

    Examples:
        >>> import torch
        >>> m, x = torch.randn(4, 4), torch.randn(2, 3, 4)
        >>> torch.allclose(project_tokens(x, m)[1, 2], m @ x[1, 2], atol=1e-6)
        True
    """
    if product.dim() != 2 or product.shape[0] != product.shape[1]:
        raise ValueError(f'`product` must be (d, d), got '
                         f'{tuple(product.shape)}')
    if tokens.dim() == 0 or tokens.shape[-1] != product.shape[0]:
        raise ValueError(f'`tokens` must be (..., {product.shape[0]}), got '
                         f'{tuple(tokens.shape)}')
    dtype = torch.promote_types(tokens.dtype, product.dtype)
    return tokens.to(dtype) @ product.to(device=tokens.device, dtype=dtype).T


# ---------------------------------------------------------------------------
# Accumulators
# ---------------------------------------------------------------------------
def _as_float64_rows(tokens: Tensor, dim: int, name: Optional[str],
                     what: str) -> Tensor:
    """Validate tokens of shape ``(..., dim)`` and return them as float64."""
    if not isinstance(tokens, Tensor):
        raise ValueError(f'{_prefix(name)}{what} must be a Tensor, got '
                         f'{type(tokens).__name__}')
    if tokens.dim() == 0 or tokens.shape[-1] != dim:
        raise ValueError(f'{_prefix(name)}{what} must have last dimension '
                         f'{dim}, got shape {tuple(tokens.shape)}')
    if tokens.is_complex():
        raise ValueError(f'{_prefix(name)}{what} must be real, got '
                         f'{tokens.dtype}')
    tokens = tokens.detach()
    if tokens.is_floating_point():
        # One NaN would silently poison every later block's whitening; it
        # is cheaper to stop here and say where it came from.
        bad = int((~torch.isfinite(tokens)).sum())
        if bad:
            raise ValueError(
                f'{_prefix(name)}{what} has {bad} non-finite value(s) out of '
                f'{tokens.numel()} (shape {tuple(tokens.shape)}); check the '
                'backbone (fp16 overflow?) before computing whitening')
    return tokens.to(torch.float64)


def _dist_ready() -> bool:
    return dist.is_available() and dist.is_initialized()


def _comm_device(group=None) -> Optional[torch.device]:
    # NCCL only reduces CUDA tensors; gloo and others take CPU ones.
    if dist.get_backend(group) == 'nccl':
        return torch.device('cuda', torch.cuda.current_device())
    return None


def _all_reduce_sum(tensor: Tensor, group=None) -> Tensor:
    device = _comm_device(group) or tensor.device
    buf = tensor.to(device)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
    return buf.to(tensor.device)



def _check_mergeable(acc, other) -> None:
    """Refuse to merge accumulators of another kind or another ``dim``."""
    kind = type(acc).__name__
    if type(other) is not type(acc):
        raise ValueError(f'{_prefix(acc.name)}can only merge a {kind}, got '
                         f'{type(other).__name__}')
    if other.dim != acc.dim:
        raise ValueError(f'{_prefix(acc.name)}cannot merge an accumulator of '
                         f'dim {other.dim} into one of dim {acc.dim}')

class SecondMomentAccumulator:
    """Streams ``sum x x^T``, ``sum x`` and the count of token rows.

    The accumulator takes *projected* tokens (rows of ``X~^T``, see
    :func:`project_tokens`) and gives the paper's ``Sigma = X~ X~^T / N``.
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

    def __init__(self, dim: int, name: Optional[str] = None,
                 device: Union[str, torch.device] = 'cpu') -> None:
        self._dim = _check_int(dim, 'dim')
        self.name = name
        self._outer = torch.zeros(dim, dim, dtype=torch.float64,
                                  device=device)
        self._sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self._count = 0

    @property
    def dim(self) -> int:
        """Token width ``d``."""
        return self._dim

    @property
    def num_tokens(self) -> int:
        """Number of token rows accumulated (``N``)."""
        return self._count

    @property
    def device(self) -> torch.device:
        """Device of the sums."""
        return self._outer.device

    def update(self, tokens: Tensor) -> 'SecondMomentAccumulator':
        """Add projected tokens.

        Args:
            tokens (Tensor): Shape ``(..., d)``; leading dimensions (batch,
                tokens) are flattened. Any real dtype; accumulated in
                float64.

        Returns:
            SecondMomentAccumulator: ``self``.
        """
        rows = _as_float64_rows(tokens, self._dim, self.name, 'update')
        rows = rows.reshape(-1, self._dim).to(self.device)
        self._outer += rows.T @ rows
        self._sum += rows.sum(0)
        self._count += rows.shape[0]
        return self

    def merge(self, other: 'SecondMomentAccumulator'
              ) -> 'SecondMomentAccumulator':
        """Add another accumulator's sums into this one.

        Args:
            other (SecondMomentAccumulator): Same ``dim``; left unchanged.

        Returns:
            SecondMomentAccumulator: ``self``.
        """
        _check_mergeable(self, other)
        self._outer += other._outer.to(self.device)
        self._sum += other._sum.to(self.device)
        self._count += other._count
        return self

    def all_reduce(self, group=None) -> 'SecondMomentAccumulator':
        """Sum the statistics over ``torch.distributed`` processes.

        Afterwards every process holds the statistics of all of them, so
        each computes the same ``W`` without a broadcast. A no-op when
        ``torch.distributed`` is not initialised. Every process must call
        it (it is a collective), and only once per accumulation: a second
        call would count the others' tokens again.

        Args:
            group (ProcessGroup, optional): Process group; default world.

        Returns:
            SecondMomentAccumulator: ``self``.
        """
        if not _dist_ready():
            return self
        # One flat float64 buffer -> one collective. Counts stay exact in
        # float64 up to 2**53 tokens.
        flat = torch.cat([
            self._outer.reshape(-1), self._sum,
            torch.tensor([float(self._count)], dtype=torch.float64,
                         device=self.device)
        ])
        flat = _all_reduce_sum(flat, group)
        d2 = self._dim * self._dim
        self._outer.copy_(flat[:d2].reshape(self._dim, self._dim))
        self._sum.copy_(flat[d2:d2 + self._dim])
        self._count = int(round(flat[-1].item()))
        return self

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
            raise RuntimeError(f'{_prefix(self.name)}no tokens accumulated; '
                               'call update() before second_moment()')
        if self._count < self._dim:
            warnings.warn(
                f'{_prefix(self.name)}only {self._count} tokens for d='
                f'{self._dim} channels: the second moment has rank < d and '
                'its whitening is set by eps alone in the missing '
                'directions; use more images', FewTokensWarning,
                stacklevel=2)
        sigma = self._outer / self._count
        if center:
            # One-pass centring; in float64 the cancellation costs
            # log10(|mu|^2 / var) of ~16 digits, acceptable for tokens.
            mean = self._sum / self._count
            sigma = sigma - torch.outer(mean, mean)
        # x^T x from a BLAS gemm is not bitwise symmetric.
        return (sigma + sigma.T) / 2

    def mean(self) -> Tensor:
        """Mean projected token (float64, shape ``(d,)``)."""
        if self._count == 0:
            raise RuntimeError(f'{_prefix(self.name)}no tokens accumulated')
        return self._sum / self._count

    def state_dict(self) -> Dict[str, Any]:
        """Sums and count (copies), e.g. to save and reuse statistics."""
        return {
            'dim': self._dim,
            'num_tokens': self._count,
            'outer': self._outer.clone(),
            'sum': self._sum.clone(),
        }

    def load_state_dict(self, state: Dict[str, Any]
                        ) -> 'SecondMomentAccumulator':
        """Restore :meth:`state_dict` output (``dim`` must match).

        Returns:
            SecondMomentAccumulator: ``self``.
        """
        missing = {'dim', 'num_tokens', 'outer', 'sum'} - set(state)
        if missing:
            raise ValueError(f'{_prefix(self.name)}state_dict lacks '
                             f'{sorted(missing)}')
        if state['dim'] != self._dim \
                or tuple(state['outer'].shape) != (self._dim, self._dim) \
                or tuple(state['sum'].shape) != (self._dim, ):
            raise ValueError(f'{_prefix(self.name)}state_dict is for dim '
                             f'{state["dim"]}, this accumulator has dim '
                             f'{self._dim}')
        self._outer.copy_(state['outer'])
        self._sum.copy_(state['sum'])
        self._count = int(state['num_tokens'])
        return self

    def __repr__(self) -> str:
        return (f'{type(self).__name__}(dim={self._dim}, name={self.name!r},'
                f' num_tokens={self._count})')


class ImageAverageAccumulator:
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

    def __init__(self, dim: int, tokens_per_image: Optional[int] = None,
                 name: Optional[str] = None,
                 device: Union[str, torch.device] = 'cpu') -> None:
        self._dim = _check_int(dim, 'dim')
        if tokens_per_image is not None:
            _check_int(tokens_per_image, 'tokens_per_image')
        self.name = name
        self._device = torch.device(device)
        self._n = tokens_per_image
        self._image_sum: Optional[Tensor] = None
        self._num_images = 0
        if self._n is not None:
            self._alloc(self._n)

    def _alloc(self, n: int) -> None:
        self._n = n
        self._image_sum = torch.zeros(
            n, self._dim, dtype=torch.float64, device=self._device)

    @property
    def dim(self) -> int:
        """Token width ``d``."""
        return self._dim

    @property
    def tokens_per_image(self) -> Optional[int]:
        """``n``, or None before the first update."""
        return self._n

    @property
    def num_images(self) -> int:
        """Number of images accumulated."""
        return self._num_images

    @property
    def num_tokens(self) -> int:
        """Number of token rows accumulated (images x ``n``)."""
        return self._num_images * (self._n or 0)

    @property
    def device(self) -> torch.device:
        """Device of the sums."""
        return self._device

    def update(self, tokens: Tensor) -> 'ImageAverageAccumulator':
        """Add the projected tokens of a batch of images.

        Args:
            tokens (Tensor): ``(B, n, d)`` for ``B`` images, or ``(n, d)``
                for one image; ``n`` must be the same in every update.

        Returns:
            ImageAverageAccumulator: ``self``.
        """
        rows = _as_float64_rows(tokens, self._dim, self.name, 'update')
        if rows.dim() == 2:
            rows = rows.unsqueeze(0)
        if rows.dim() != 3:
            raise ValueError(f'{_prefix(self.name)}update must be (B, n, d) '
                             f'or (n, d) for the image-average statistic, got'
                             f' shape {tuple(tokens.shape)}')
        n = rows.shape[1]
        if self._n is None:
            self._alloc(_check_int(n, 'tokens per image'))
        elif n != self._n:
            raise ValueError(f'{_prefix(self.name)}the image-average '
                             'statistic needs the same number of tokens in '
                             f'every image: had {self._n}, got {n} (resize '
                             'images to one size)')
        self._image_sum += rows.sum(0).to(self._device)
        self._num_images += rows.shape[0]
        return self

    def merge(self, other: 'ImageAverageAccumulator'
              ) -> 'ImageAverageAccumulator':
        """Add another accumulator's sums into this one.

        Returns:
            ImageAverageAccumulator: ``self``.
        """
        _check_mergeable(self, other)
        if other._n is None:
            return self
        if self._n is None:
            self._alloc(other._n)
        elif other._n != self._n:
            raise ValueError(f'{_prefix(self.name)}cannot merge '
                             f'{other._n} tokens per image into {self._n}')
        self._image_sum += other._image_sum.to(self._device)
        self._num_images += other._num_images
        return self

    def all_reduce(self, group=None) -> 'ImageAverageAccumulator':
        """Sum the statistics over ``torch.distributed`` processes.

        A no-op when ``torch.distributed`` is not initialised. Collective:
        every process must call it, once. A process that saw no image
        learns ``n`` from the others.

        Returns:
            ImageAverageAccumulator: ``self``.
        """
        if not _dist_ready():
            return self
        # Agree on n first; every rank sees the same max/min, so a mismatch
        # raises on all of them instead of hanging in the next collective.
        mine = self._n or 0
        dev = _comm_device(group) or torch.device('cpu')
        hi = torch.tensor([mine], dtype=torch.int64, device=dev)
        lo = torch.tensor([mine if mine else 2**62], dtype=torch.int64,
                          device=dev)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=group)
        dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=group)
        n_max, n_min = int(hi.item()), int(lo.item())
        if n_max == 0:
            return self
        if n_min != n_max:
            raise ValueError(f'{_prefix(self.name)}processes saw different '
                             f'tokens per image ({n_min} vs {n_max})')
        if self._n is None:
            self._alloc(n_max)
        flat = torch.cat([
            self._image_sum.reshape(-1),
            torch.tensor([float(self._num_images)], dtype=torch.float64,
                         device=self._device)
        ])
        flat = _all_reduce_sum(flat, group)
        self._image_sum.copy_(flat[:-1].reshape(self._n, self._dim))
        self._num_images = int(round(flat[-1].item()))
        return self

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
        if self._num_images == 0:
            raise RuntimeError(f'{_prefix(self.name)}no images accumulated; '
                               'call update() before second_moment()')
        if self._n < self._dim:
            warnings.warn(
                f'{_prefix(self.name)}the image-average statistic has rank '
                f'<= {self._n} tokens per image < d={self._dim}: its '
                'whitening is set by eps alone in the missing directions',
                FewTokensWarning, stacklevel=2)
        avg = self._image_sum / self._num_images  # n x d, i.e. X~_avg^T
        sigma = avg.T @ avg / self._dim
        return (sigma + sigma.T) / 2

    def state_dict(self) -> Dict[str, Any]:
        """Sums and counts (copies)."""
        return {
            'dim': self._dim,
            'tokens_per_image': self._n,
            'num_images': self._num_images,
            'image_sum': None if self._image_sum is None else
            self._image_sum.clone(),
        }

    def load_state_dict(self, state: Dict[str, Any]
                        ) -> 'ImageAverageAccumulator':
        """Restore :meth:`state_dict` output (``dim`` must match)."""
        missing = {'dim', 'tokens_per_image', 'num_images', 'image_sum'} \
            - set(state)
        if missing:
            raise ValueError(f'{_prefix(self.name)}state_dict lacks '
                             f'{sorted(missing)}')
        if state['dim'] != self._dim:
            raise ValueError(f'{_prefix(self.name)}state_dict is for dim '
                             f'{state["dim"]}, this accumulator has dim '
                             f'{self._dim}')
        if state['tokens_per_image'] is None:
            self._n, self._image_sum = None, None
        else:
            self._alloc(int(state['tokens_per_image']))
            self._image_sum.copy_(state['image_sum'])
        self._num_images = int(state['num_images'])
        return self

    def __repr__(self) -> str:
        return (f'{type(self).__name__}(dim={self._dim}, name={self.name!r},'
                f' tokens_per_image={self._n}, '
                f'num_images={self._num_images})')


# ---------------------------------------------------------------------------
# ZCA
# ---------------------------------------------------------------------------
def _regularised_eigh(sigma: Tensor, eps: float) -> Tuple[Tensor, Tensor]:
    """Eigen-decomposition of symmetrised ``sigma`` with ``S + reg``."""
    eps = _check_eps(eps)
    if not isinstance(sigma, Tensor) or sigma.dim() != 2 \
            or sigma.shape[0] != sigma.shape[1] or sigma.shape[0] == 0:
        shape = tuple(sigma.shape) if isinstance(sigma, Tensor) \
            else type(sigma).__name__
        raise ValueError(f'`sigma` must be a square (d, d) matrix, got '
                         f'{shape}')
    s64 = sigma.detach().to(torch.float64)
    bad = int((~torch.isfinite(s64)).sum())
    if bad:
        raise ValueError(f'`sigma` has {bad} non-finite value(s)')
    # eigh reads one triangle only; symmetrising makes the result not depend
    # on which one, and on rounding noise in the other.
    s64 = (s64 + s64.T) / 2
    dim = s64.shape[0]
    trace = float(torch.diagonal(s64).sum())
    if not trace > 0:
        raise ValueError(f'`sigma` has trace {trace} (<= 0): it is not a '
                         'second moment of any nonzero tokens (all-zero '
                         'features?), so there is nothing to whiten')
    evals, evecs = torch.linalg.eigh(s64)
    # Rounding makes null directions slightly negative; they are zero.
    # The regulariser is relative to the mean eigenvalue so one eps works
    # for blocks whose token scales differ by orders of magnitude.
    evals = evals.clamp_min(0) + eps * trace / dim
    if not bool((evals > 0).all()):
        raise ValueError('`sigma` is singular and `eps`=0; use eps > 0')
    return evals, evecs


def zca_whitening_matrix(sigma: Tensor, eps: float = 1e-5,
                         dtype: torch.dtype = torch.float32) -> Tensor:
    """ZCA whitening ``W = U diag((S + reg)^{-1/2}) U^T`` of ``Sigma``.

    ZCA is the symmetric inverse square root: of all whitening matrices it
    is the one closest to the identity, so a prompt ``P W^T`` stays close
    to ``P`` in the directions the data already spread evenly.

    Args:
        sigma (Tensor): Second moment ``(d, d)``; symmetrised first.
        eps (float): Regulariser relative to the spectrum:
            ``reg = eps * trace(Sigma) / d`` is added to the eigenvalues
            (clamped at 0 first). 0 disables it (then ``Sigma`` must be
            nonsingular). Defaults to 1e-5.
        dtype (torch.dtype): Output dtype. Defaults to float32.

    Returns:
        Tensor: ``W`` of shape ``(d, d)``, exactly symmetric, on ``sigma``'s
        device. ``W Sigma W^T ~= I`` up to the regulariser.

    Examples:
        >>> import torch
        >>> a = torch.randn(6, 6, dtype=torch.float64)
        >>> sigma = a @ a.T + torch.eye(6, dtype=torch.float64)
        >>> w = zca_whitening_matrix(sigma, eps=0, dtype=torch.float64)
        >>> torch.allclose(w @ sigma @ w.T, torch.eye(6, dtype=torch.float64))
        True
        >>> bool((w == w.T).all())
        True
    """
    evals, evecs = _regularised_eigh(sigma, eps)
    w = (evecs * evals.rsqrt()) @ evecs.T
    # The two-sided product is symmetric only up to rounding; make it exact
    # so that W and W^T are interchangeable downstream.
    w = (w + w.T) / 2
    return w.to(dtype)


def effective_rank(sigma: Tensor, eps: float = 1e-5) -> int:
    """Directions in which the data, not the regulariser, defines ``W``.

    The number of eigenvalues of ``sigma`` above the regulariser of
    :func:`zca_whitening_matrix` (``eps`` times the mean eigenvalue; with
    ``eps=0``, above rounding noise).

    Args:
        sigma (Tensor): Second moment ``(d, d)``.
        eps (float): As in :func:`zca_whitening_matrix`. Defaults to 1e-5.

    Returns:
        int: The effective rank, from 0 to ``d``.

    Examples:
        >>> import torch
        >>> effective_rank(torch.diag(torch.tensor([4., 1., 0.])), eps=1e-3)
        2
    """
    evals, _ = _regularised_eigh(sigma, eps)
    dim = evals.numel()
    reg = eps * float(torch.diagonal(sigma.detach().to(torch.float64)).sum()
                      ) / dim
    noise = dim * torch.finfo(torch.float64).eps * float(evals.max())
    return int(((evals - reg) > max(reg, noise)).sum())


def condition_number(sigma: Tensor, eps: float = 1e-5) -> float:
    """Condition number ``max / min`` of the regularised spectrum ``S + reg``.

    This is the factor between the largest and smallest gains of ``W``
    (squared); worth logging per block to see how much eps matters.

    Args:
        sigma (Tensor): Second moment ``(d, d)``.
        eps (float): As in :func:`zca_whitening_matrix`. Defaults to 1e-5.

    Returns:
        float: The condition number (>= 1).

    Examples:
        >>> import torch
        >>> condition_number(torch.diag(torch.tensor([4., 1.])), eps=0)
        4.0
    """
    evals, _ = _regularised_eigh(sigma, eps)
    return float(evals.max() / evals.min())


# ---------------------------------------------------------------------------
# Options and the whole chain
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class WhiteningStatistics:
    """The choices behind one set of whitening statistics.

    The defaults are the paper's definition; every field the authors' code
    sets differently can be switched to reproduce it (``statistic='authors'``,
    ``product='authors'``, ``tokens='all'``, ``eps`` small). The ``tokens``
    and ``source`` fields are acted on by the caller (the hook that collects
    tokens); they live here so that one config dict describes the whole
    choice and is logged with the result.

    Args:
        tokens (str): Which tokens enter ``Sigma``: ``'patch'`` (default;
            CLS and prompts excluded, as in the paper) or ``'all'`` (CLS and
            patches, as the authors' code; never prompts).
        source (str): Where the tokens are taken: ``'block_input'``
            (default; the tokens entering the block, before its LayerNorm,
            as the authors) or ``'norm1'`` (the LayerNorm output that the
            attention really sees).
        center (bool): Subtract the mean token before the second moment.
            Defaults to False (as the paper).
        statistic (str): ``'paper'`` (default): ``Sigma = X~ X~^T / N`` over
            all ``N`` tokens. ``'authors'``: average ``X~`` (``d x n``) over
            the images first, then ``Sigma = X~_avg X~_avg^T / d``; needs a
            fixed ``n`` per image (see :class:`ImageAverageAccumulator`).
        product (str): The query-key product, see
            :func:`query_key_product`: ``'qk'`` (default), ``'kq'``,
            ``'authors'`` or ``'authors_mae'`` (``W_q W_q^T``, the authors'
            MAE shallow file).
        eps (float): Relative regulariser of :func:`zca_whitening_matrix`.
            Defaults to 1e-5.

    Examples:
        >>> opts = WhiteningStatistics(statistic='authors', product='authors')
        >>> type(opts.make_accumulator(8, name='block 0')).__name__
        'ImageAverageAccumulator'
    """

    tokens: str = 'patch'
    source: str = 'block_input'
    center: bool = False
    statistic: str = 'paper'
    product: str = 'qk'
    eps: float = 1e-5

    def __post_init__(self) -> None:
        _check_choice(self.tokens, TOKEN_SETS, 'tokens')
        _check_choice(self.source, TOKEN_SOURCES, 'source')
        _check_choice(self.statistic, STATISTICS, 'statistic')
        _check_choice(self.product, QK_ORDERS, 'product')
        if not isinstance(self.center, bool):
            raise ValueError(f'`center` must be a bool, got '
                             f'{self.center!r}')
        if self.center and self.statistic == 'authors':
            raise ValueError('`center`=True is not defined for '
                             "`statistic`='authors'")
        _check_eps(self.eps)

    def make_accumulator(
        self, dim: int, name: Optional[str] = None,
        device: Union[str, torch.device] = 'cpu'
    ) -> Union[SecondMomentAccumulator, ImageAverageAccumulator]:
        """A fresh accumulator for :attr:`statistic`.

        Args:
            dim (int): Token width ``d``.
            name (str, optional): Label for messages, e.g. ``'block 3'``.
            device (str | torch.device): Where the sums live.

        Returns:
            SecondMomentAccumulator | ImageAverageAccumulator: Both have
            ``update``, ``merge``, ``all_reduce``, ``second_moment``,
            ``state_dict`` and ``load_state_dict``.
        """
        if self.statistic == 'paper':
            return SecondMomentAccumulator(dim, name=name, device=device)
        return ImageAverageAccumulator(dim, name=name, device=device)


def whitening_from_tokens(
    tokens: Union[Tensor, Iterable[Tensor]],
    qkv_weight: Tensor,
    options: Optional[WhiteningStatistics] = None,
    name: Optional[str] = None,
) -> Tuple[Tensor, Dict[str, Any]]:
    """Whitening matrix of one block from its (unprojected) tokens.

    Projects the tokens with the block's query-key product, accumulates the
    statistic chosen by ``options`` in float64 and returns its ZCA whitening.
    Selecting the tokens (``options.tokens``, ``options.source``) is the
    caller's job.

    Args:
        tokens (Tensor | Iterable[Tensor]): Tokens ``(..., d)``, or batches
            of them. For ``statistic='authors'`` each tensor is
            ``(B, n, d)`` or one image ``(n, d)``.
        qkv_weight (Tensor): The block's ``attn.qkv.weight``, ``(3d, d)``.
        options (WhiteningStatistics, optional): Defaults to the paper's.
        name (str, optional): Block label for messages and warnings.

    Returns:
        tuple[Tensor, dict]: ``W`` (float32, ``(d, d)``) and a dict with
        ``num_tokens`` (N), ``num_images`` (authors' statistic only),
        ``dim``, ``eps``, ``condition_number`` (float) and ``sigma`` (the
        float64 second moment, e.g. for :func:`whitened_bilinear_basis`).

    Examples:
        >>> import torch
        >>> x, qkv = torch.randn(500, 8), torch.randn(24, 8)
        >>> w, info = whitening_from_tokens(x, qkv, name='block 0')
        >>> w.shape, info['num_tokens']
        (torch.Size([8, 8]), 500)
    """
    options = WhiteningStatistics() if options is None else options
    if not isinstance(options, WhiteningStatistics):
        raise ValueError('`options` must be a WhiteningStatistics, got '
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
            raise ValueError(f'{_prefix(name)}`tokens` must be (..., {dim}) '
                             f'to match `qkv_weight`, got {shape}')
        # Check before projecting: M mixes channels, so one bad input value
        # would be reported as d bad ones.
        rows = _as_float64_rows(batch, dim, name, '`tokens`')
        acc.update(project_tokens(rows, product))
    sigma = acc.second_moment(center=options.center)
    w = zca_whitening_matrix(sigma, eps=options.eps)
    info: Dict[str, Any] = {
        'num_tokens': acc.num_tokens,
        'dim': dim,
        'eps': options.eps,
        'condition_number': condition_number(sigma, options.eps),
        'sigma': sigma,
    }
    if isinstance(acc, ImageAverageAccumulator):
        info['num_images'] = acc.num_images
    return w, info


# ---------------------------------------------------------------------------
# BPT-bilinear
# ---------------------------------------------------------------------------
def whitened_bilinear_basis(whitening: Tensor,
                            rank: int,
                            mode: str = 'random',
                            sigma: Optional[Tensor] = None,
                            generator: Optional[torch.Generator] = None
                            ) -> Tensor:
    """Initial ``B = W C`` (``d x p``) of a bilinear prompt ``A B^T``.

    ``C`` has orthonormal columns, so ``B`` spans a ``p``-dimensional slice
    of the whitened space with the same gains as ``W``; with ``p = d`` and
    ``C = I`` the bilinear prompt is exactly the whitened one.

    Args:
        whitening (Tensor): ``W``, ``(d, d)``.
        rank (int): ``p``, ``1 <= p <= d``.
        mode (str): How to choose ``C``: ``'random'`` (default; QR of a
            Gaussian, with the signs of ``R``'s diagonal folded in so the
            result depends only on ``generator``), ``'eigen'`` (the top-``p``
            eigenvectors of ``sigma``: the directions with the most energy
            before whitening) or ``'identity'`` (the first ``p`` columns of
            ``I``, i.e. the first ``p`` columns of ``W``).
        sigma (Tensor, optional): The second moment ``(d, d)``; required by
            ``mode='eigen'``, ignored otherwise.
        generator (torch.Generator, optional): For ``mode='random'`` (a CPU
            generator; the draw is made on the CPU).

    Returns:
        Tensor: ``B`` of shape ``(d, p)`` in ``whitening``'s dtype and
        device.

    Examples:
        >>> import torch
        >>> w = zca_whitening_matrix(torch.eye(4) * 4.0, eps=0)
        >>> b = whitened_bilinear_basis(w, 2, 'identity')
        >>> b
        tensor([[0.5000, 0.0000],
                [0.0000, 0.5000],
                [0.0000, 0.0000],
                [0.0000, 0.0000]])
    """
    if not isinstance(whitening, Tensor) or whitening.dim() != 2 \
            or whitening.shape[0] != whitening.shape[1]:
        shape = tuple(whitening.shape) if isinstance(whitening, Tensor) \
            else type(whitening).__name__
        raise ValueError(f'`whitening` must be a square (d, d) matrix, got '
                         f'{shape}')
    _check_choice(mode, BASIS_MODES, 'mode')
    dim = whitening.shape[0]
    _check_int(rank, 'rank')
    if rank > dim:
        raise ValueError(f'`rank` must be in [1, d={dim}], got {rank}')
    if mode == 'identity':
        # Slicing, not W @ I, so that p = d returns W bit for bit.
        return whitening[:, :rank].clone()
    if mode == 'random':
        gauss = torch.randn(dim, rank, generator=generator,
                            dtype=torch.float64)
        basis, tri = torch.linalg.qr(gauss)
        # QR is unique only up to column signs; fixing diag(R) > 0 makes C
        # a function of the Gaussian draw alone (i.e. of the generator).
        signs = torch.sign(torch.diagonal(tri))
        signs[signs == 0] = 1
        basis = basis * signs
    else:
        if sigma is None:
            raise ValueError("`sigma` is required by `mode`='eigen'")
        if not isinstance(sigma, Tensor) or tuple(sigma.shape) != (dim, dim):
            shape = tuple(sigma.shape) if isinstance(sigma, Tensor) \
                else type(sigma).__name__
            raise ValueError(f'`sigma` must be ({dim}, {dim}) like '
                             f'`whitening`, got {shape}')
        s64 = sigma.detach().to(torch.float64).cpu()
        _, evecs = torch.linalg.eigh((s64 + s64.T) / 2)
        basis = evecs.flip(-1)[:, :rank]  # eigh sorts ascending
        # An eigenvector's sign is arbitrary; make each one's largest entry
        # positive so the result does not depend on the LAPACK build.
        idx = basis.abs().argmax(0)
        signs = torch.sign(basis[idx, torch.arange(rank)])
        basis = basis * signs
    w64 = whitening.detach().to(torch.float64)
    return (w64 @ basis.to(w64.device)).to(whitening.dtype)
