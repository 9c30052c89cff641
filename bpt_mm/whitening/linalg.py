"""The linear algebra of BPT whitening (pure torch).

For one ViT block whose attention has the weight ``qkv.weight`` of shape
``(3d, d)`` (PyTorch's out x in layout; rows ``0:d`` are ``W_q`` and rows
``d:2d`` are ``W_k``) the logit between a prompt ``u`` and a patch token
``v`` (row vectors, biases and scale aside) is

.. math::  u W_q^T W_k v^T = u M v^T, \\qquad M = W_q^T W_k .

A prompt's logits are therefore linear in the *projected* tokens
``X~ = M X^T`` (``d x N`` for ``N`` patch tokens ``X``), whose entries are
bursty. The paper whitens them with ZCA::

    Sigma = X~ X~^T / N,   W = Sigma^{-1/2} = U (S + reg)^{-1/2} U^T.

This module gives the pieces, none of which needs mmengine or a model:

* :func:`query_key_product` builds ``M`` (or the authors' variant) from a
  block's ``qkv.weight`` (:func:`qk_product`: its body, for checked
  arguments);
* :func:`project_tokens` turns ``(..., d)`` tokens into the rows of ``X~^T``;
* :func:`whitening_spectrum` decomposes ``Sigma`` once, with the
  regulariser; the :class:`WhiteningSpectrum` it returns gives ``W``, the
  condition number and the effective rank together, and
  :func:`zca_whitening_matrix`, :func:`condition_number` and
  :func:`effective_rank` are views of it for a single use;
* :func:`whitened_bilinear_basis` builds ``B = W C`` for BPT-bilinear.

The second moments themselves are streamed by
:mod:`bpt_mm.whitening.accumulators`. Row-vector convention throughout:
tokens are rows, so ``X~^T = X M^T`` and the whitened rows of ``X~^T`` are
``X~^T W^T`` (``= X~^T W``, ``W`` is symmetric).
"""
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from bpt_mm.choices import check_choice

from .options import (BASIS_MODES, QK_ORDERS, WhiteningOptions,
                      check_positive_int)

__all__ = ['query_key_product', 'qk_product', 'project_tokens',
           'WhiteningSpectrum', 'whitening_spectrum', 'zca_whitening_matrix',
           'condition_number', 'effective_rank', 'whitened_bilinear_basis',
           'sigma_eigenvectors', 'bilinear_basis']


# ---------------------------------------------------------------------------
# The query-key product
# ---------------------------------------------------------------------------
def query_key_product(qkv_weight: Tensor,
                      num_heads: Optional[int] = None,
                      order: str = WhiteningOptions.product) -> Tensor:
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
    check_choice(order, QK_ORDERS, 'order')
    dim = qkv_weight.shape[1]
    if num_heads is not None:
        check_positive_int(num_heads, 'num_heads')
        if dim % num_heads:
            raise ValueError(f'`num_heads`={num_heads} does not divide the '
                             f'width d={dim} of `qkv_weight`')
    return qk_product(qkv_weight, order)


def qk_product(qkv_weight: Tensor, order: str) -> Tensor:
    """The body of :func:`query_key_product`, for arguments already
    checked: ``order`` by :class:`WhiteningOptions` (``product``),
    ``qkv_weight`` a block's own ``attn.qkv.weight``. Direct callers use
    :func:`query_key_product`, which checks.

    Args:
        qkv_weight (Tensor): ``(3d, d)``, q/k/v stacked along dim 0.
        order (str): One of ``'qk'``, ``'kq'``, ``'authors'``,
            ``'authors_mae'``.

    Returns:
        Tensor: The ``(d, d)`` product, in ``qkv_weight``'s dtype and device.
    """
    dim = qkv_weight.shape[1]
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
# ZCA: one eigendecomposition of Sigma
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class WhiteningSpectrum:
    """The regularised spectrum of one ``Sigma``: everything the whitening
    of a block needs from its eigendecomposition.

    Build it with :func:`whitening_spectrum`.

    Attributes:
        eigenvalues (Tensor): ``S + reg``, ascending, float64 (``(d,)``).
        eigenvectors (Tensor): ``U``, float64 ``(d, d)``, one per column.
        regulariser (float): ``reg = eps * trace(Sigma) / d``.
    """

    eigenvalues: Tensor
    eigenvectors: Tensor
    regulariser: float

    def whitening(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """ZCA whitening ``W = U diag((S + reg)^{-1/2}) U^T``.

        ZCA is the symmetric inverse square root: of all whitening matrices
        it is the one closest to the identity, so a prompt ``P W^T`` stays
        close to ``P`` in the directions the data already spread evenly.

        Args:
            dtype (torch.dtype): Output dtype. Defaults to float32.

        Returns:
            Tensor: ``W`` of shape ``(d, d)``, exactly symmetric, on
            ``Sigma``'s device.
        """
        evecs = self.eigenvectors
        w = (evecs * self.eigenvalues.rsqrt()) @ evecs.T
        # The two-sided product is symmetric only up to rounding; make it
        # exact so that W and W^T are interchangeable downstream.
        w = (w + w.T) / 2
        return w.to(dtype)

    def condition_number(self) -> float:
        """``max / min`` of ``S + reg``: the factor between the largest and
        smallest gains of ``W`` (squared); worth logging per block to see
        how much eps matters."""
        return float(self.eigenvalues.max() / self.eigenvalues.min())

    def effective_rank(self) -> int:
        """Directions in which the data, not the regulariser, defines ``W``:
        the eigenvalues of ``Sigma`` above ``reg`` (with ``eps=0``, above
        rounding noise), from 0 to ``d``."""
        evals = self.eigenvalues
        dim = evals.numel()
        noise = dim * torch.finfo(torch.float64).eps * float(evals.max())
        return int(((evals - self.regulariser)
                    > max(self.regulariser, noise)).sum())


def whitening_spectrum(sigma: Tensor,
                       options: Optional[WhiteningOptions] = None
                       ) -> WhiteningSpectrum:
    """Decompose symmetrised ``sigma`` once and add the regulariser.

    The regulariser is relative to the spectrum:
    ``reg = options.eps * trace(Sigma) / d`` is added to the eigenvalues
    (clamped at 0 first); ``eps=0`` disables it (then ``Sigma`` must be
    nonsingular). ``options`` was checked when it was built, so ``eps`` is
    not checked again here.

    Args:
        sigma (Tensor): Second moment ``(d, d)``; symmetrised first.
        options (WhiteningOptions, optional): Its ``eps``; default
            :class:`WhiteningOptions`'s.

    Returns:
        WhiteningSpectrum: ``S + reg``, ``U`` and ``reg``.

    Examples:
        >>> import torch
        >>> spectrum = whitening_spectrum(torch.diag(torch.tensor([4., 1.])),
        ...                               WhiteningOptions(eps=0))
        >>> spectrum.condition_number(), spectrum.effective_rank()
        (4.0, 2)
        >>> spectrum.whitening()
        tensor([[0.5000, 0.0000],
                [0.0000, 1.0000]])
    """
    options = WhiteningOptions() if options is None else options
    if not isinstance(options, WhiteningOptions):
        raise ValueError('`options` must be a WhiteningOptions (e.g. '
                         'WhiteningOptions(eps=...)), got '
                         f'{type(options).__name__}')
    eps = options.eps
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
    regulariser = eps * trace / dim
    evals = evals.clamp_min(0) + regulariser
    if not bool((evals > 0).all()):
        raise ValueError('`sigma` is singular and `eps`=0; use eps > 0')
    return WhiteningSpectrum(evals, evecs, regulariser)


def zca_whitening_matrix(sigma: Tensor, eps: float = WhiteningOptions.eps,
                         dtype: torch.dtype = torch.float32) -> Tensor:
    """``W`` of :func:`whitening_spectrum` (see
    :meth:`WhiteningSpectrum.whitening`), for a single use.

    Args:
        sigma (Tensor): Second moment ``(d, d)``; symmetrised first.
        eps (float): ``eps`` of :class:`WhiteningOptions` (checked by it).
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
    return whitening_spectrum(sigma, WhiteningOptions(eps=eps)).whitening(
        dtype)


def effective_rank(sigma: Tensor, eps: float = WhiteningOptions.eps) -> int:
    """:meth:`WhiteningSpectrum.effective_rank` of ``sigma``, for a single
    use.

    Args:
        sigma (Tensor): Second moment ``(d, d)``.
        eps (float): ``eps`` of :class:`WhiteningOptions` (checked by it).

    Returns:
        int: The effective rank, from 0 to ``d``.

    Examples:
        >>> import torch
        >>> effective_rank(torch.diag(torch.tensor([4., 1., 0.])), eps=1e-3)
        2
    """
    return whitening_spectrum(sigma,
                              WhiteningOptions(eps=eps)).effective_rank()


def condition_number(sigma: Tensor, eps: float = WhiteningOptions.eps
                     ) -> float:
    """:meth:`WhiteningSpectrum.condition_number` of ``sigma``, for a single
    use.

    Args:
        sigma (Tensor): Second moment ``(d, d)``.
        eps (float): ``eps`` of :class:`WhiteningOptions` (checked by it).

    Returns:
        float: The condition number (>= 1).

    Examples:
        >>> import torch
        >>> condition_number(torch.diag(torch.tensor([4., 1.])), eps=0)
        4.0
    """
    return whitening_spectrum(sigma,
                              WhiteningOptions(eps=eps)).condition_number()


# ---------------------------------------------------------------------------
# BPT-bilinear
# ---------------------------------------------------------------------------
def whitened_bilinear_basis(whitening: Tensor,
                            rank: int,
                            bilinear_init: str = (
                                WhiteningOptions.bilinear_init),
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
        bilinear_init (str): How to choose ``C``: ``'random'`` (default;
            QR of a Gaussian, with the signs of ``R``'s diagonal folded in
            so the result depends only on ``generator``), ``'eigen'`` (the
            top-``p`` eigenvectors of ``sigma``: the directions with the
            most energy before whitening) or ``'identity'`` (the first
            ``p`` columns of ``I``, i.e. the first ``p`` columns of ``W``).
        sigma (Tensor, optional): The second moment ``(d, d)``; required by
            ``bilinear_init='eigen'``, ignored otherwise.
        generator (torch.Generator, optional): For
            ``bilinear_init='random'`` (a CPU generator; the draw is made
            on the CPU).

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
    check_choice(bilinear_init, BASIS_MODES, 'bilinear_init')
    dim = whitening.shape[0]
    check_positive_int(rank, 'rank')
    if rank > dim:
        raise ValueError(f'`rank` must be in [1, d={dim}], got {rank}')
    eigenvectors = None
    if bilinear_init == 'eigen':
        if sigma is None:
            raise ValueError("`sigma` is required by "
                             "`bilinear_init`='eigen'")
        if not isinstance(sigma, Tensor) or tuple(sigma.shape) != (dim, dim):
            shape = tuple(sigma.shape) if isinstance(sigma, Tensor) \
                else type(sigma).__name__
            raise ValueError(f'`sigma` must be ({dim}, {dim}) like '
                             f'`whitening`, got {shape}')
        eigenvectors = sigma_eigenvectors(sigma)
    return bilinear_basis(whitening, rank, bilinear_init, eigenvectors,
                          generator)


def sigma_eigenvectors(sigma: Tensor) -> Tensor:
    """``U`` of ``Sigma`` alone (no regulariser, no checks), for a
    ``'eigen'`` basis where no :class:`WhiteningSpectrum` is at hand (a
    whitening file's ``sigma``): the same decomposition as
    :func:`whitening_spectrum`'s (symmetrised, float64), on the CPU, so
    both routes give the same ``B`` bit for bit.

    Args:
        sigma (Tensor): ``(d, d)``.

    Returns:
        Tensor: float64 ``(d, d)``, one eigenvector per column, ascending
        eigenvalues.
    """
    s64 = sigma.detach().to(torch.float64).cpu()
    return torch.linalg.eigh((s64 + s64.T) / 2)[1]


def bilinear_basis(whitening: Tensor, rank: int, bilinear_init: str,
                   eigenvectors: Optional[Tensor] = None,
                   generator: Optional[torch.Generator] = None) -> Tensor:
    """The body of :func:`whitened_bilinear_basis`, for arguments already
    checked: ``rank`` and ``bilinear_init`` by the prompt's options and
    :class:`WhiteningOptions`, ``eigenvectors`` from the one
    :class:`WhiteningSpectrum` of ``Sigma`` (so ``'eigen'`` does not
    decompose ``Sigma`` again). Direct callers use
    :func:`whitened_bilinear_basis`, which checks.

    Args:
        whitening (Tensor): ``W``, ``(d, d)``.
        rank (int): ``p``, ``1 <= p <= d``.
        bilinear_init (str): One of ``'random'``, ``'eigen'``,
            ``'identity'``.
        eigenvectors (Tensor, optional): ``U`` of ``Sigma``, float64
            ``(d, d)``, ascending eigenvalues (:attr:`WhiteningSpectrum.
            eigenvectors`); used by ``'eigen'`` only.
        generator (torch.Generator, optional): For ``'random'``.

    Returns:
        Tensor: ``B`` of shape ``(d, p)`` in ``whitening``'s dtype and
        device.
    """
    dim = whitening.shape[0]
    if bilinear_init == 'identity':
        # Slicing, not W @ I, so that p = d returns W bit for bit.
        return whitening[:, :rank].clone()
    if bilinear_init == 'random':
        gauss = torch.randn(dim, rank, generator=generator,
                            dtype=torch.float64)
        basis, tri = torch.linalg.qr(gauss)
        # QR is unique only up to column signs; fixing diag(R) > 0 makes C
        # a function of the Gaussian draw alone (i.e. of the generator).
        signs = torch.sign(torch.diagonal(tri))
        signs[signs == 0] = 1
        basis = basis * signs
    else:
        basis = eigenvectors.cpu().flip(-1)[:, :rank]  # eigh sorts ascending
        # An eigenvector's sign is arbitrary; make each one's largest entry
        # positive so the result does not depend on the LAPACK build.
        idx = basis.abs().argmax(0)
        signs = torch.sign(basis[idx, torch.arange(rank)])
        basis = basis * signs
    w64 = whitening.detach().to(torch.float64)
    return (w64 @ basis.to(w64.device)).to(whitening.dtype)
