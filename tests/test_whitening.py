"""Tests of the whitening wing: second moments, ZCA, query-key products, bases.

Small dimensions keep the file fast; the checks are exact or tight where the
algebra is exact and statistical (with a stated margin) where sampling enters.
"""
import doctest
import os
import time
import warnings
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import bpt_mm.whitening.accumulators
import bpt_mm.whitening.collect
import bpt_mm.whitening.linalg
import bpt_mm.whitening.options
from bpt_mm.whitening.accumulators import (FewTokensWarning,
                                           ImageAverageAccumulator,
                                           SecondMomentAccumulator)
from bpt_mm.whitening.collect import whitening_from_tokens
from bpt_mm.whitening.linalg import (condition_number, effective_rank,
                                     project_tokens, query_key_product,
                                     whitened_bilinear_basis,
                                     zca_whitening_matrix)
from bpt_mm.whitening.options import WhiteningOptions
from helpers import count_calls, previous_whitening

F64 = torch.float64


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _eye(d: int) -> torch.Tensor:
    return torch.eye(d, dtype=F64)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


@pytest.fixture(scope='module')
def known_cov_data():
    """N = 20000 samples of d = 16 with covariance A A^T (spread spectrum)."""
    d, n = 16, 20000
    g = _gen(0)
    # Column scales over a decade so that whitening has real work to do
    # (condition number ~1e3-1e4) while eps = 1e-8 stays negligible.
    a = torch.randn(d, d, generator=g, dtype=F64) * torch.logspace(
        0, -1, d, dtype=F64)
    x = torch.randn(n, d, generator=g, dtype=F64) @ a.T
    return x, a @ a.T


# ---------------------------------------------------------------------------
# ZCA
# ---------------------------------------------------------------------------
def test_zca_whitens_known_covariance(known_cov_data):
    x, sigma_true = known_cov_data
    d = x.shape[1]
    acc = SecondMomentAccumulator(d).update(x)
    sigma = acc.second_moment()
    w = zca_whitening_matrix(sigma, eps=1e-8, dtype=F64)

    assert torch.equal(w, w.T)
    assert _rel_err(w @ sigma @ w.T, _eye(d)) < 1e-4
    # Whitened rows are x W^T; their second moment is the identity.
    xw = x @ w.T
    assert _rel_err(xw.T @ xw / x.shape[0], _eye(d)) < 1e-4
    # W estimates Sigma_true^{-1/2}: sampling error ~ sqrt(d / N) ~ 3%.
    evals, evecs = torch.linalg.eigh(sigma_true)
    w_true = (evecs * evals.rsqrt()) @ evecs.T
    assert _rel_err(w, w_true) < 0.1
    assert _rel_err(w @ sigma_true @ w.T, _eye(d)) < 0.1


def test_zca_default_float32_symmetric_and_eps_scale(known_cov_data):
    x, _ = known_cov_data
    sigma = SecondMomentAccumulator(16).update(x).second_moment()
    w = zca_whitening_matrix(sigma)
    assert w.dtype == torch.float32 and torch.equal(w, w.T)
    # The regulariser is relative: scaling the data by c scales W by 1/c.
    w_scaled = zca_whitening_matrix(sigma * 1e6, eps=1e-3, dtype=F64)
    w_ref = zca_whitening_matrix(sigma, eps=1e-3, dtype=F64)
    assert _rel_err(w_scaled * 1e3, w_ref) < 1e-10


def test_zca_regulariser_on_singular_sigma():
    g = _gen(1)
    x = torch.randn(3, 8, generator=g, dtype=F64)  # rank 3 < d = 8
    sigma = x.T @ x / 3
    with pytest.raises(ValueError, match='singular'):
        zca_whitening_matrix(sigma, eps=0)
    w = zca_whitening_matrix(sigma, eps=1e-2, dtype=F64)
    assert torch.isfinite(w).all()
    # Eigenvalues of W Sigma W are S / (S + reg): 0 in the null space,
    # just below 1 where the data live.
    ev = torch.linalg.eigvalsh(w @ sigma @ w)
    assert ev.min() > -1e-10 and ev.max() < 1
    assert torch.allclose(ev[-3:], torch.ones(3, dtype=F64), atol=0.05)


def test_condition_number():
    sigma = torch.diag(torch.tensor([4.0, 2.0, 1.0, 1.0], dtype=F64))
    assert condition_number(sigma, eps=0) == pytest.approx(4.0)
    reg = 0.5 * 8 / 4  # eps * trace / d
    assert condition_number(sigma, eps=0.5) == pytest.approx(
        (4 + reg) / (1 + reg))
    # Slightly negative rounding eigenvalues count as zero.
    sigma[3, 3] = -1e-14
    assert condition_number(sigma, eps=0.1) == pytest.approx(
        (4 + 0.1 * 7 / 4) / (0.1 * 7 / 4))


# ---------------------------------------------------------------------------
# Accumulators
# ---------------------------------------------------------------------------
def test_batched_accumulation_equals_one_go(known_cov_data):
    x, _ = known_cov_data
    x = x[:3000] + 0.5  # a nonzero mean so that centring matters
    one = SecondMomentAccumulator(16).update(x)
    batched = SecondMomentAccumulator(16)
    for chunk in torch.split(x, 777):
        batched.update(chunk.reshape(-1, 7, 16) if len(chunk) % 7 == 0
                       else chunk)
    assert batched.num_tokens == one.num_tokens == 3000
    for center in (False, True):
        torch.testing.assert_close(
            batched.second_moment(center), one.second_moment(center),
            rtol=0, atol=1e-12)
    # Centred = numpy's biased covariance; uncentred = X^T X / N.
    np.testing.assert_allclose(
        one.second_moment(center=True).numpy(),
        np.cov(x.numpy(), rowvar=False, bias=True), rtol=0, atol=1e-12)
    np.testing.assert_allclose(
        one.second_moment().numpy(), (x.T @ x / 3000).numpy(), rtol=0,
        atol=1e-12)


def test_leading_dims_and_dtypes_are_flattened():
    x = torch.randn(2, 5, 7, 4, generator=_gen(2))
    acc = SecondMomentAccumulator(4).update(x)
    assert acc.num_tokens == 70
    rows = x.reshape(-1, 4).double()
    torch.testing.assert_close(acc.second_moment(), rows.T @ rows / 70)
    assert acc.second_moment().dtype == F64


def test_merge_equals_union():
    g = _gen(3)
    a, b = torch.randn(40, 6, generator=g), torch.randn(25, 6, generator=g)
    left = SecondMomentAccumulator(6).update(a)
    right = SecondMomentAccumulator(6).update(b)
    union = SecondMomentAccumulator(6).update(torch.cat([a, b]))
    assert left.merge(right) is left
    assert left.num_tokens == 65 and right.num_tokens == 25
    for center in (False, True):
        torch.testing.assert_close(left.second_moment(center),
                                   union.second_moment(center), rtol=0,
                                   atol=1e-12)
    with pytest.raises(ValueError, match='dim 5'):
        left.merge(SecondMomentAccumulator(5))


def test_state_dict_roundtrip():
    g = _gen(4)
    acc = SecondMomentAccumulator(5, name='block 1').update(
        torch.randn(30, 5, generator=g))
    state = acc.state_dict()
    restored = SecondMomentAccumulator(5).load_state_dict(state)
    assert restored.num_tokens == 30
    torch.testing.assert_close(restored.second_moment(True),
                               acc.second_moment(True), rtol=0, atol=0)
    # The state is a copy: later updates do not change it, and both
    # accumulators continue identically.
    more = torch.randn(10, 5, generator=g)
    acc.update(more)
    restored.update(more)
    assert state['num_tokens'] == 30
    torch.testing.assert_close(restored.second_moment(),
                               acc.second_moment(), rtol=0, atol=0)
    with pytest.raises(ValueError, match='dim'):
        SecondMomentAccumulator(4).load_state_dict(state)


def test_image_average_state_dict_roundtrip():
    x = torch.randn(3, 5, 4, generator=_gen(5))
    acc = ImageAverageAccumulator(4).update(x)
    restored = ImageAverageAccumulator(4).load_state_dict(acc.state_dict())
    assert restored.num_images == 3 and restored.tokens_per_image == 5
    torch.testing.assert_close(restored.second_moment(),
                               acc.second_moment(), rtol=0, atol=0)


def test_non_finite_update_raises_with_label():
    acc = SecondMomentAccumulator(4, name='block 3')
    x = torch.randn(10, 4)
    x[1, 2], x[4, 0], x[7, 3] = float('nan'), float('inf'), -float('inf')
    with pytest.raises(ValueError, match=r'block 3.*3 non-finite'):
        acc.update(x)
    assert acc.num_tokens == 0  # a refused update leaves no trace
    with pytest.raises(ValueError, match=r'block 3.*last dimension 4'):
        acc.update(torch.randn(10, 5))
    with pytest.raises(ValueError, match=r'block 3.*non-finite'):
        whitening_from_tokens(x, torch.randn(12, 4), name='block 3')


def test_empty_accumulator_raises():
    with pytest.raises(RuntimeError, match='block 2.*no tokens'):
        SecondMomentAccumulator(4, name='block 2').second_moment()
    with pytest.raises(RuntimeError, match='no images'):
        ImageAverageAccumulator(4).second_moment()


def test_few_tokens_warns_with_label():
    acc = SecondMomentAccumulator(8, name='block 5').update(
        torch.randn(7, 8))
    with pytest.warns(FewTokensWarning, match='block 5'):
        acc.second_moment()
    acc.update(torch.randn(1, 8))
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        acc.second_moment()  # N = d: no warning
    with pytest.warns(FewTokensWarning, match='block 6'):
        whitening_from_tokens(torch.randn(3, 8), torch.randn(24, 8),
                              name='block 6')


def test_all_reduce_is_noop_without_distributed():
    assert not dist.is_initialized()
    acc = SecondMomentAccumulator(3).update(torch.randn(4, 3))
    before = acc.second_moment()
    assert acc.all_reduce() is acc
    assert acc.num_tokens == 4
    torch.testing.assert_close(acc.second_moment(), before, rtol=0, atol=0)


def _all_reduce_worker(rank: int, world: int, init_file: str) -> None:
    # Forked child: each rank accumulates its part, then all_reduce must
    # give every rank the single-process result.
    # The parent's OpenMP/MKL thread pool does not survive fork(); a
    # multi-threaded matmul here would wait on it forever (DataLoader
    # workers do the same).
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'file://{init_file}',
                            rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        g = _gen(7)
        x = torch.randn(100, 6, generator=g, dtype=F64)
        full = SecondMomentAccumulator(6).update(x)
        mine = SecondMomentAccumulator(6)
        for chunk in torch.split(x[rank * 50:(rank + 1) * 50], 20):
            mine.update(chunk)
        mine.all_reduce()
        assert mine.num_tokens == 100
        for center in (False, True):
            torch.testing.assert_close(mine.second_moment(center),
                                       full.second_moment(center), rtol=0,
                                       atol=1e-12)
        # A rank with no tokens still takes part and ends up with all.
        lonely = SecondMomentAccumulator(6)
        if rank == 0:
            lonely.update(x)
        lonely.all_reduce()
        torch.testing.assert_close(lonely.second_moment(),
                                   full.second_moment(), rtol=0, atol=1e-12)
        # The authors' statistic: images split 2 / 3, and a rank that saw
        # no image learns the token count from the other.
        imgs = torch.randn(5, 3, 6, generator=g, dtype=F64)
        img_full = ImageAverageAccumulator(6).update(imgs)
        img = ImageAverageAccumulator(6)
        img.update(imgs[:2] if rank == 0 else imgs[2:])
        img.all_reduce()
        img_lonely = ImageAverageAccumulator(6)
        if rank == 1:
            img_lonely.update(imgs)
        img_lonely.all_reduce()
        for acc in (img, img_lonely):
            assert acc.num_images == 5 and acc.tokens_per_image == 3
            with warnings.catch_warnings():
                warnings.simplefilter('ignore', FewTokensWarning)
                torch.testing.assert_close(acc.second_moment(),
                                           img_full.second_moment(),
                                           rtol=0, atol=1e-12)
    finally:
        dist.destroy_process_group()


def test_all_reduce_two_gloo_processes(tmp_path):
    init_file = str(tmp_path / 'pg_init')
    # 'fork' rather than 'spawn': a spawned child re-imports torch, which
    # takes seconds; the children run single-threaded (see the worker).
    ctx = mp.start_processes(_all_reduce_worker, args=(2, init_file),
                             nprocs=2, join=False, start_method='fork')
    deadline = time.monotonic() + 30
    try:
        # join() re-raises a child's exception in this process.
        while not ctx.join(timeout=1):
            assert time.monotonic() < deadline, 'all_reduce workers hung'
    finally:
        for proc in ctx.processes:
            if proc.is_alive():
                proc.kill()


# ---------------------------------------------------------------------------
# Query-key product
# ---------------------------------------------------------------------------
def test_query_key_product_matches_multi_head_logits():
    d, heads = 16, 4
    g = _gen(8)
    qkv = torch.randn(3 * d, d, generator=g, dtype=F64)
    u = torch.randn(3, d, generator=g, dtype=F64)  # e.g. prompts
    v = torch.randn(5, d, generator=g, dtype=F64)  # e.g. patch tokens
    # Attention as timm computes it (no bias, scale aside): per-head q k^T.
    q = (u @ qkv[:d].T).reshape(3, heads, d // heads).transpose(0, 1)
    k = (v @ qkv[d:2 * d].T).reshape(5, heads, d // heads).transpose(0, 1)
    logits = (q @ k.transpose(1, 2)).sum(0)  # (3, 5), summed over heads
    m = query_key_product(qkv, num_heads=heads)
    torch.testing.assert_close(u @ m @ v.T, logits, rtol=1e-12, atol=1e-10)
    # Single head: u M v^T = (u W_q^T)(v W_k^T)^T = q k^T.
    torch.testing.assert_close(
        u @ m @ v.T, (u @ qkv[:d].T) @ (v @ qkv[d:2 * d].T).T, rtol=1e-12,
        atol=1e-10)
    # Projected tokens are the rows of X~^T = (M X^T)^T.
    torch.testing.assert_close(project_tokens(v, m), (m @ v.T).T)
    # 'kq' is the transpose: logits with the prompt as the key.
    m_kq = query_key_product(qkv, order='kq')
    torch.testing.assert_close(m_kq, m.T, rtol=0, atol=0)
    torch.testing.assert_close(v @ m @ u.T, (u @ m_kq @ v.T).T)
    # float32 weights give a float32 product close to the float64 one.
    m32 = query_key_product(qkv.float())
    assert m32.dtype == torch.float32
    torch.testing.assert_close(m32.double(), m, rtol=1e-5, atol=1e-4)


def test_authors_product_is_wq_wk_transposed():
    d = 6
    qkv = torch.randn(3 * d, d, generator=_gen(9), dtype=F64)
    w_q, w_k = qkv[:d], qkv[d:2 * d]
    m_auth = query_key_product(qkv, order='authors')
    torch.testing.assert_close(m_auth, w_q @ w_k.T, rtol=0, atol=0)
    # W_q W_k^T contracts the input channels; for generic weights it is
    # neither M = W_q^T W_k nor its transpose.
    m = query_key_product(qkv)
    assert _rel_err(m_auth, m.T) > 0.1 and _rel_err(m_auth, m) > 0.1
    # ... but it is M^T when W_q is the identity (a sanity check of the
    # claim's limited range of validity).
    qkv_id = qkv.clone()
    qkv_id[:d] = _eye(d)
    torch.testing.assert_close(query_key_product(qkv_id, order='authors'),
                               query_key_product(qkv_id).T)


# ---------------------------------------------------------------------------
# Options, the authors' statistic, whitening_from_tokens
# ---------------------------------------------------------------------------
def test_authors_statistic_matches_numpy():
    d, n, images = 4, 3, 5
    g = _gen(10)
    qkv = torch.randn(3 * d, d, generator=g, dtype=F64)
    x = torch.randn(images, n, d, generator=g, dtype=F64)
    # The authors' recipe, written out in numpy: X~ per image is d x n.
    q, k, xn = qkv[:d].numpy(), qkv[d:2 * d].numpy(), x.numpy()
    qkx = (q @ k.T @ xn.transpose(0, 2, 1)).mean(axis=0)  # d x n
    sigma_np = qkx @ qkx.T / qkx.shape[0]  # divides by d
    opts = WhiteningOptions(statistic='authors', product='authors',
                               tokens='all', eps=1e-3)
    with pytest.warns(FewTokensWarning, match='block 0'):  # n = 3 < d = 4
        w, info = whitening_from_tokens([x[:3], x[3], x[4:]], qkv, opts,
                                        name='block 0')
    np.testing.assert_allclose(info['sigma'].numpy(), sigma_np, rtol=1e-12,
                               atol=1e-12)
    assert info['num_images'] == 5 and info['num_tokens'] == 15
    w_ref = zca_whitening_matrix(torch.from_numpy(sigma_np), eps=1e-3)
    torch.testing.assert_close(w, w_ref)
    with pytest.raises(ValueError, match='same number of tokens'):
        ImageAverageAccumulator(d).update(x).update(x[:, :2])


def test_whitening_from_tokens_paper_statistic():
    d = 8
    g = _gen(11)
    qkv = torch.randn(3 * d, d, generator=g)
    x = torch.randn(4, 50, d, generator=g) + 1.0
    w, info = whitening_from_tokens(x, qkv, WhiteningOptions(eps=1e-9))
    m = query_key_product(qkv.double())
    xt = (x.double().reshape(-1, d) @ m.T)
    torch.testing.assert_close(info['sigma'], xt.T @ xt / 200, rtol=1e-12,
                               atol=1e-12)
    assert info['num_tokens'] == 200 and 'num_images' not in info
    assert info['condition_number'] == pytest.approx(
        condition_number(info['sigma'], 1e-9))
    assert w.dtype == torch.float32
    # The whitened projected tokens have identity second moment.
    xw = xt @ w.double()
    assert _rel_err(xw.T @ xw / 200, _eye(d)) < 1e-4
    # An iterable of batches gives the same result; centring changes it.
    w_it, _ = whitening_from_tokens(iter(x), qkv,
                                    WhiteningOptions(eps=1e-9))
    torch.testing.assert_close(w_it, w)
    _, info_c = whitening_from_tokens(
        x, qkv, WhiteningOptions(center=True, eps=1e-9))
    xc = xt - xt.mean(0)
    torch.testing.assert_close(info_c['sigma'], xc.T @ xc / 200)


def test_options_make_matching_accumulators():
    assert isinstance(WhiteningOptions().make_accumulator(4),
                      SecondMomentAccumulator)
    acc = WhiteningOptions(statistic='authors').make_accumulator(
        4, name='block 9')
    assert isinstance(acc, ImageAverageAccumulator) and acc.name == 'block 9'
    opts = WhiteningOptions()
    assert (opts.tokens, opts.source, opts.center, opts.statistic,
            opts.product) == ('patch', 'block_input', False, 'paper', 'qk')


# ---------------------------------------------------------------------------
# Bilinear basis
# ---------------------------------------------------------------------------
@pytest.fixture(scope='module')
def small_whitening():
    d = 8
    x = torch.randn(400, d, generator=_gen(12), dtype=F64) * torch.arange(
        1, d + 1, dtype=F64)
    sigma = x.T @ x / 400
    return zca_whitening_matrix(sigma, eps=1e-6, dtype=F64), sigma


def test_bilinear_identity_full_rank_is_w(small_whitening):
    w, _ = small_whitening
    assert torch.equal(whitened_bilinear_basis(w, 8, 'identity'), w)
    w32 = w.float()
    b = whitened_bilinear_basis(w32, 3, 'identity')
    assert b.dtype == torch.float32 and torch.equal(b, w32[:, :3])


def test_bilinear_random_is_whitened_orthonormal(small_whitening):
    w, _ = small_whitening
    b = whitened_bilinear_basis(w, 5, 'random', generator=_gen(13))
    assert b.shape == (8, 5)
    c = torch.linalg.solve(w, b)
    torch.testing.assert_close(c.T @ c, _eye(5), rtol=0, atol=1e-10)
    # C is Gram-Schmidt of the Gaussian draw: C^T G = R is upper triangular
    # with a positive diagonal (the sign convention that makes QR unique).
    gauss = torch.randn(8, 5, generator=_gen(13), dtype=F64)
    r = c.T @ gauss
    torch.testing.assert_close(torch.tril(r, -1), torch.zeros(5, 5,
                                                              dtype=F64),
                               rtol=0, atol=1e-8)
    assert (torch.diagonal(r) > 0).all()
    # Deterministic given the generator; another seed gives another basis.
    torch.testing.assert_close(
        whitened_bilinear_basis(w, 5, 'random', generator=_gen(13)), b,
        rtol=0, atol=0)
    assert not torch.allclose(
        whitened_bilinear_basis(w, 5, 'random', generator=_gen(14)), b)


def test_bilinear_eigen_uses_top_eigenvectors(small_whitening):
    w, sigma = small_whitening
    with pytest.raises(ValueError, match='sigma'):
        whitened_bilinear_basis(w, 3, 'eigen')
    b = whitened_bilinear_basis(w, 3, 'eigen', sigma=sigma)
    c = torch.linalg.solve(w, b)
    top = torch.linalg.eigvalsh(sigma)[-3:].flip(0)
    torch.testing.assert_close(c.T @ c, _eye(3), rtol=0, atol=1e-10)
    torch.testing.assert_close(sigma @ c, c * top, rtol=1e-8, atol=1e-8)


# ---------------------------------------------------------------------------
# Argument checking
# ---------------------------------------------------------------------------
_W = torch.eye(4)


@pytest.mark.parametrize('call, pattern', [
    (lambda: query_key_product(torch.zeros(8, 4)), 'qkv_weight'),
    (lambda: query_key_product(torch.zeros(12, 4), order='kqv'),
     r"`order`.*'qk'.*'authors'"),
    (lambda: query_key_product(torch.zeros(12, 4), num_heads=3),
     'num_heads'),
    (lambda: zca_whitening_matrix(torch.zeros(3, 4)), 'sigma'),
    (lambda: zca_whitening_matrix(torch.tensor([[1., float('nan')],
                                                [0., 1.]])), 'non-finite'),
    (lambda: zca_whitening_matrix(_W, eps=-1e-3), 'eps'),
    (lambda: zca_whitening_matrix(torch.zeros(4, 4)), 'trace'),
    (lambda: condition_number(_W, eps=float('nan')), 'eps'),
    (lambda: WhiteningOptions(statistic='mean'),
     r"`statistic`.*'paper'"),
    (lambda: WhiteningOptions(product='vq'), '`product`'),
    (lambda: WhiteningOptions(tokens='cls'), '`tokens`'),
    (lambda: WhiteningOptions(source='norm2'), '`source`'),
    (lambda: WhiteningOptions(center=True, statistic='authors'),
     '`center`'),
    (lambda: WhiteningOptions(eps=-1.0), '`eps`'),
    (lambda: whitened_bilinear_basis(_W, 5), '`rank`'),
    (lambda: whitened_bilinear_basis(_W, 0), '`rank`'),
    (lambda: whitened_bilinear_basis(_W, 2, bilinear_init='pca'),
     r"`bilinear_init`.*'random'.*'eigen'.*'identity'"),
    (lambda: whitened_bilinear_basis(_W, 2, 'eigen', sigma=torch.eye(3)),
     '`sigma`'),
    (lambda: SecondMomentAccumulator(0), '`dim`'),
    (lambda: SecondMomentAccumulator(4).merge(ImageAverageAccumulator(4)),
     'SecondMomentAccumulator'),
    (lambda: ImageAverageAccumulator(4).update(torch.zeros(2, 2, 2, 4)),
     r'\(B, n, d\)'),
])
def test_bad_arguments_raise_value_error(call, pattern):
    with pytest.raises(ValueError, match=pattern):
        call()


# ---------------------------------------------------------------------------
# One eigendecomposition of Sigma gives W, condition number and rank
# ---------------------------------------------------------------------------
@pytest.mark.parametrize('eps, rows', [(1e-5, 300), (1e-3, 5), (0.0, 40)])
def test_one_eigendecomposition_gives_the_previous_results(monkeypatch, eps,
                                                           rows):
    # 5 rows of 8 channels: a rank-deficient Sigma, where the effective
    # rank is below d; eps=0 with enough rows: no regulariser at all.
    x = torch.randn(rows, 8, generator=_gen(31), dtype=F64)
    qkv = torch.randn(24, 8, generator=_gen(32), dtype=F64)
    calls = count_calls(monkeypatch, 'eigh', module=torch.linalg)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', FewTokensWarning)
        w, info = whitening_from_tokens(x, qkv, WhiteningOptions(eps=eps))
    assert len(calls) == 1
    want_w, want_cond, want_rank = previous_whitening(info['sigma'], eps)
    assert torch.equal(w, want_w)
    assert info['condition_number'] == want_cond
    assert info['effective_rank'] == want_rank
    assert (want_rank < 8) == (rows < 8)
    # The single-use views agree with the shared decomposition.
    assert torch.equal(zca_whitening_matrix(info['sigma'], eps), w)
    assert condition_number(info['sigma'], eps) == want_cond
    assert effective_rank(info['sigma'], eps) == want_rank


def test_docstring_examples():
    # The Examples sections are runnable; keep them honest.
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', FewTokensWarning)
        results = [doctest.testmod(module, verbose=False) for module in (
            bpt_mm.whitening.linalg, bpt_mm.whitening.accumulators,
            bpt_mm.whitening.options, bpt_mm.whitening.collect)]
    attempted = sum(r.attempted for r in results)
    failed = sum(r.failed for r in results)
    assert attempted > 10 and failed == 0


if __name__ == '__main__':
    pytest.main([os.path.abspath(__file__), '-q'])


def test_authors_mae_product_is_their_product_with_query_weights_as_keys():
    # The authors' MAE shallow model file loads W_q into the key projection
    # too, so their product W_q W_k^T becomes W_q W_q^T.
    d = 8
    qkv = torch.randn(3 * d, d, generator=_gen(21), dtype=F64)
    as_loaded = qkv.clone()
    as_loaded[d:2 * d] = qkv[:d]
    mae = query_key_product(qkv, order='authors_mae')
    torch.testing.assert_close(
        mae, query_key_product(as_loaded, order='authors'), rtol=0, atol=0)
    torch.testing.assert_close(mae, mae.T, rtol=0, atol=0)
    assert not torch.allclose(mae, query_key_product(qkv, order='authors'))
    assert WhiteningOptions(product='authors_mae').product == 'authors_mae'
    with pytest.raises(ValueError, match='authors_mae'):
        WhiteningOptions(product='mae')
