"""Burstiness statistics of a sample of values (numpy; scipy for the fits).

The BPT paper argues from measured distributions: the entries of
``X~ = M X^T`` (``M = W_q^T W_k``) are bursty, patch embeddings are roughly
Laplacian, the entries of ``M`` hyper-Laplacian, and whitening brings the
data closer to a Gaussian. This module measures such claims on any sample of
values, without a model or mmengine:

* :func:`kurtosis` (Pearson's, 3 for a Gaussian) and
  :func:`top_mass_fraction` (the share of ``sum |x|`` held by the largest 1%
  of ``|x|``, a burstiness index);
* maximum-likelihood fits of a Gaussian (:func:`fit_gaussian`), a Laplacian
  (:func:`fit_laplacian`) and a generalised Gaussian with its shape
  (:func:`fit_generalized_gaussian`), with their log-likelihoods;
* :func:`select_family`, the rule that names the best of them, and
  :func:`describe`, everything at once as a JSON-friendly dict.

The generalised Gaussian (GG) of location ``mu``, scale ``alpha`` and shape
``beta`` has the density

.. math:: f(x) = \\frac{\\beta}{2\\alpha\\Gamma(1/\\beta)}
          \\exp\\big(-(|x-\\mu|/\\alpha)^\\beta\\big);

``beta = 2`` is a Gaussian (``alpha = sqrt(2) sigma``), ``beta = 1`` a
Laplacian (``alpha = b``) and ``beta < 1`` is what the paper calls
*hyper-Laplacian*.

Family selection (:func:`select_family`): the Gaussian and the Laplacian have
two parameters, the GG three. Each fit is scored by the Bayesian information
criterion ``BIC = k ln n - 2 log L`` and the lowest wins, so the GG must gain
more than ``ln(n) / 2`` nats of log-likelihood over the better two-parameter
family to be chosen. A winning GG is named ``'hyper-laplacian'`` when its
shape is below 1 and ``'generalized-gaussian'`` otherwise. The GG fit is made
at the Gaussian's location (the mean) and at the Laplacian's (the median),
and the better is kept, so its log-likelihood is never below either
two-parameter fit (the families are nested in it), up to the tolerance of the
one-dimensional shape search.
"""
import math
from dataclasses import asdict, dataclass
from typing import Any, Dict, Optional, Tuple

import numpy as np

__all__ = [
    'FAMILIES', 'DistributionFit', 'as_values', 'kurtosis',
    'top_mass_fraction', 'generalized_gaussian_kurtosis', 'fit_gaussian',
    'fit_laplacian', 'fit_generalized_gaussian', 'fit_all', 'select_family',
    'log_density', 'describe'
]

#: Names :func:`select_family` can return.
FAMILIES = ('gaussian', 'laplacian', 'hyper-laplacian',
            'generalized-gaussian')
#: Bounds of the GG shape search. Wide enough for the shapes the paper
#: reports (about 0.3 to 2) with margin; a fit that ends on a bound is
#: flagged (``at_bound``).
SHAPE_BOUNDS = (0.05, 8.0)
#: Fewest values a fit accepts: below this a three-parameter fit is noise.
MIN_VALUES = 10


@dataclass(frozen=True)
class DistributionFit:
    """One maximum-likelihood fit.

    Attributes:
        family (str): ``'gaussian'``, ``'laplacian'`` or
            ``'generalized-gaussian'``.
        loc (float): Location (mean, median, or the GG's).
        scale (float): Gaussian: the standard deviation ``sigma``;
            Laplacian: ``b`` (mean absolute deviation); GG: ``alpha``.
        shape (float): The GG shape ``beta``; 2 for the Gaussian and 1 for
            the Laplacian (fixed, not fitted).
        log_likelihood (float): Total log-likelihood of the sample (nats).
        num_params (int): Fitted parameters (2 or 3).
        bic (float): ``num_params * ln(n) - 2 * log_likelihood``.
        at_bound (bool): The GG shape search ended on a bound of
            :data:`SHAPE_BOUNDS` (the optimum may lie beyond it).
    """

    family: str
    loc: float
    scale: float
    shape: float
    log_likelihood: float
    num_params: int
    bic: float
    at_bound: bool = False

    def as_dict(self) -> Dict[str, Any]:
        """The fields as a plain dict (for JSON)."""
        return asdict(self)


def as_values(x: Any) -> np.ndarray:
    """Flatten ``x`` (numpy array, torch tensor, sequence) to float64.

    Args:
        x: Any array-like; a torch tensor is detached and moved to the CPU.

    Returns:
        np.ndarray: 1-D float64 copy or view of the values.

    Raises:
        ValueError: ``x`` is empty or holds non-finite values.

    Examples:
        >>> as_values([[1, 2], [3, 4]])
        array([1., 2., 3., 4.])
    """
    if hasattr(x, 'detach'):  # a torch tensor, without importing torch
        x = x.detach().cpu().double().numpy()
    values = np.asarray(x, dtype=np.float64).reshape(-1)
    if values.size == 0:
        raise ValueError('the sample is empty')
    bad = int((~np.isfinite(values)).sum())
    if bad:
        raise ValueError(f'the sample has {bad} non-finite value(s) out of '
                         f'{values.size}')
    return values


def _checked(x: Any, minimum: int = MIN_VALUES) -> np.ndarray:
    values = as_values(x)
    if values.size < minimum:
        raise ValueError(f'a fit needs at least {minimum} values, got '
                         f'{values.size}')
    if float(values.max()) == float(values.min()):
        raise ValueError('all values are equal: a distribution fit needs a '
                         'sample with spread')
    return values


def kurtosis(x: Any) -> float:
    """Pearson's kurtosis ``E[(x - mean)^4] / var^2`` (not the excess).

    3 for a Gaussian, 6 for a Laplacian, 25.2 for a generalised Gaussian of
    shape 0.5 (see :func:`generalized_gaussian_kurtosis`). The plug-in
    estimate (population moments of the sample).

    Args:
        x: The sample (any array-like).

    Returns:
        float: The kurtosis; ``nan`` when all values are equal.

    Examples:
        >>> kurtosis([-1.0, 1.0, -1.0, 1.0])
        1.0
    """
    values = as_values(x)
    centred = values - values.mean()
    largest = float(np.abs(centred).max())
    if largest == 0:
        return float('nan')
    # The ratio does not depend on the scale, but the fourth powers of
    # values near 1e-80 underflow (near 1e80 overflow) to 0/0: bring the
    # largest to [0.5, 1) by a power of two, which is exact, so results
    # on ordinary scales do not change by a bit.
    centred = np.ldexp(centred, -np.frexp(largest)[1])
    var = float(np.mean(centred ** 2))
    return float(np.mean(centred ** 4) / var ** 2)


def top_mass_fraction(x: Any, fraction: float = 0.01) -> float:
    """Share of ``sum |x|`` held by the largest ``fraction`` of ``|x|``.

    A burstiness index: a bursty sample puts much of its mass in a few huge
    values. For ``fraction = 0.01`` a Gaussian gives about 0.036, a
    Laplacian about 0.056; a constant sample gives exactly ``fraction``.
    ``ceil(fraction * n)`` values count as the top.

    Args:
        x: The sample (any array-like).
        fraction (float): In ``(0, 1]``. Defaults to 0.01 (the top 1%).

    Returns:
        float: In ``[fraction, 1]`` up to rounding; ``nan`` for an all-zero
        sample.

    Examples:
        >>> top_mass_fraction([1.0] * 99 + [901.0])
        0.901
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) \
            or not 0 < fraction <= 1:
        raise ValueError(f'`fraction` must be in (0, 1], got {fraction!r}')
    mags = np.abs(as_values(x))
    total = float(mags.sum())
    if total == 0:
        return float('nan')
    k = max(1, math.ceil(fraction * mags.size))
    top = np.partition(mags, mags.size - k)[mags.size - k:]
    return float(top.sum() / total)


def generalized_gaussian_kurtosis(shape: float) -> float:
    """Kurtosis of a generalised Gaussian of shape ``beta``:
    ``Gamma(5/b) Gamma(1/b) / Gamma(3/b)^2``.

    Examples:
        >>> round(generalized_gaussian_kurtosis(2.0), 6), \\
        ...     round(generalized_gaussian_kurtosis(1.0), 6)
        (3.0, 6.0)
        >>> round(generalized_gaussian_kurtosis(0.5), 6)
        25.2
    """
    if not shape > 0:
        raise ValueError(f'`shape` must be > 0, got {shape!r}')
    b = float(shape)
    return float(math.exp(math.lgamma(5 / b) + math.lgamma(1 / b)
                          - 2 * math.lgamma(3 / b)))


def _bic(log_likelihood: float, num_params: int, n: int) -> float:
    return num_params * math.log(n) - 2 * log_likelihood


def fit_gaussian(x: Any) -> DistributionFit:
    """Maximum-likelihood Gaussian: mean and population standard deviation.

    Args:
        x: The sample (at least :data:`MIN_VALUES` values, not all equal).

    Returns:
        DistributionFit: ``scale`` is ``sigma``.

    Examples:
        >>> fit = fit_gaussian([0., 2.] * 10)
        >>> fit.loc, fit.scale
        (1.0, 1.0)
    """
    values = _checked(x)
    n = values.size
    mu = float(values.mean())
    sigma = float(np.sqrt(np.mean((values - mu) ** 2)))
    ll = -0.5 * n * (math.log(2 * math.pi * sigma ** 2) + 1)
    return DistributionFit('gaussian', mu, sigma, 2.0, ll, 2,
                           _bic(ll, 2, n))


def fit_laplacian(x: Any) -> DistributionFit:
    """Maximum-likelihood Laplacian: the median and the mean absolute
    deviation from it.

    Args:
        x: The sample (at least :data:`MIN_VALUES` values, not all equal).

    Returns:
        DistributionFit: ``scale`` is ``b``.

    Examples:
        >>> fit = fit_laplacian([-1., 0., 1.] * 4)
        >>> fit.loc, round(fit.scale, 4)
        (0.0, 0.6667)
    """
    values = _checked(x)
    n = values.size
    mu = float(np.median(values))
    b = float(np.mean(np.abs(values - mu)))
    ll = -n * (math.log(2 * b) + 1)
    return DistributionFit('laplacian', mu, b, 1.0, ll, 2, _bic(ll, 2, n))


def _gg_profile(log_abs: np.ndarray, n: int, shape: float
                ) -> Tuple[float, float]:
    """Log-likelihood maximised over the scale for a fixed shape, and that
    scale's log.

    With the shape ``b`` fixed, ``alpha = (b/n sum |x|^b)^(1/b)`` in closed
    form, and then ``sum (|x|/alpha)^b = n/b``. ``log_abs`` holds
    ``log|x - mu|`` of the nonzero deviations (zeros add nothing to the
    sum); the sum is formed by log-sum-exp so large shapes do not overflow.
    """
    scaled = shape * log_abs
    top = float(scaled.max())
    log_sum = top + math.log(float(np.exp(scaled - top).sum()))
    log_alpha = (math.log(shape) - math.log(n) + log_sum) / shape
    ll = n * (math.log(shape) - math.log(2) - log_alpha
              - math.lgamma(1 / shape) - 1 / shape)
    return ll, log_alpha


def _gg_at(values: np.ndarray, loc: float,
           bounds: Tuple[float, float]) -> Tuple[float, float, float, bool]:
    """Shape, log-scale and log-likelihood of the GG fit at ``loc``."""
    # scipy only here: importing bpt_mm (and the training hook, which needs
    # just the kurtosis) does not load it.
    from scipy.optimize import minimize_scalar
    dev = np.abs(values - loc)
    log_abs = np.log(dev[dev > 0])
    n = values.size
    lo, hi = math.log(bounds[0]), math.log(bounds[1])
    # The profile likelihood is smooth and (in practice) unimodal in
    # log(shape); a bounded Brent search on the log scale treats 0.1 -> 0.2
    # like 1 -> 2.
    res = minimize_scalar(lambda t: -_gg_profile(log_abs, n, math.exp(t))[0],
                          bounds=(lo, hi), method='bounded',
                          options=dict(xatol=1e-5))
    shape = float(math.exp(res.x))
    ll, log_alpha = _gg_profile(log_abs, n, shape)
    at_bound = bool(min(res.x - lo, hi - res.x) < 1e-3)
    return shape, log_alpha, ll, at_bound


def fit_generalized_gaussian(
        x: Any,
        shape_bounds: Tuple[float, float] = SHAPE_BOUNDS) -> DistributionFit:
    """Maximum-likelihood generalised Gaussian (location, scale, shape).

    The scale has a closed form given the shape; the shape maximises the
    resulting profile likelihood (bounded search on ``log beta``). The
    location is the mean or the median, whichever gives the higher
    likelihood (the exact MLE of the Gaussian and of the Laplacian
    respectively, so those two fits are nested in this one).

    Args:
        x: The sample (at least :data:`MIN_VALUES` values, not all equal).
        shape_bounds (tuple[float, float]): Search interval of ``beta``.
            Defaults to :data:`SHAPE_BOUNDS`.

    Returns:
        DistributionFit: ``scale`` is ``alpha``, ``shape`` is ``beta``.

    Examples:
        >>> rng = np.random.default_rng(0)
        >>> fit = fit_generalized_gaussian(rng.laplace(0, 2, 20000))
        >>> round(fit.shape, 1), abs(fit.scale - 2.0) < 0.1
        (1.0, True)
    """
    lo, hi = (float(b) for b in shape_bounds)
    if not 0 < lo < hi:
        raise ValueError(f'`shape_bounds` must be (low, high) with 0 < low < '
                         f'high, got {shape_bounds!r}')
    values = _checked(x)
    best = None
    for loc in (float(values.mean()), float(np.median(values))):
        shape, log_alpha, ll, at_bound = _gg_at(values, loc, (lo, hi))
        if best is None or ll > best[3]:
            best = (loc, shape, log_alpha, ll, at_bound)
    loc, shape, log_alpha, ll, at_bound = best
    return DistributionFit('generalized-gaussian', loc, math.exp(log_alpha),
                           shape, ll, 3, _bic(ll, 3, values.size), at_bound)


def fit_all(x: Any) -> Dict[str, DistributionFit]:
    """The three fits of ``x``, keyed ``'gaussian'``, ``'laplacian'``,
    ``'generalized-gaussian'``."""
    values = _checked(x)
    return {
        'gaussian': fit_gaussian(values),
        'laplacian': fit_laplacian(values),
        'generalized-gaussian': fit_generalized_gaussian(values),
    }


def select_family(fits: Dict[str, DistributionFit]) -> str:
    """Name the best family by BIC (see the module docstring).

    Args:
        fits (dict): As returned by :func:`fit_all`.

    Returns:
        str: One of :data:`FAMILIES`: ``'gaussian'``, ``'laplacian'``, or for
        a winning generalised Gaussian ``'hyper-laplacian'`` (shape < 1) or
        ``'generalized-gaussian'`` (shape >= 1).
    """
    missing = {'gaussian', 'laplacian', 'generalized-gaussian'} - set(fits)
    if missing:
        raise ValueError(f'`fits` lacks {sorted(missing)}; use fit_all()')
    # Ties go to the simpler family: iteration order is Gaussian, Laplacian,
    # GG and only a strictly lower BIC replaces the current best.
    best = None
    for name in ('gaussian', 'laplacian', 'generalized-gaussian'):
        if best is None or fits[name].bic < fits[best].bic:
            best = name
    if best == 'generalized-gaussian':
        return 'hyper-laplacian' if fits[best].shape < 1 else best
    return best


def log_density(fit: DistributionFit, x: Any) -> np.ndarray:
    """Log-density of a fit at the points ``x`` (e.g. to draw it).

    Examples:
        >>> fit = fit_gaussian([0., 2.] * 10)  # N(1, 1)
        >>> round(float(log_density(fit, [1.0])[0]), 4)
        -0.9189
    """
    pts = np.asarray(x, dtype=np.float64)
    dev = np.abs(pts - fit.loc)
    if fit.family == 'gaussian':
        return -0.5 * np.log(2 * np.pi * fit.scale ** 2) \
            - 0.5 * (dev / fit.scale) ** 2
    if fit.family == 'laplacian':
        return -np.log(2 * fit.scale) - dev / fit.scale
    if fit.family == 'generalized-gaussian':
        b = fit.shape
        return (math.log(b) - math.log(2 * fit.scale) - math.lgamma(1 / b)
                - (dev / fit.scale) ** b)
    raise ValueError(f'unknown family {fit.family!r}')


def describe(x: Any, fraction: float = 0.01,
             fits: Optional[Dict[str, DistributionFit]] = None
             ) -> Dict[str, Any]:
    """All statistics of a sample as a JSON-friendly dict.

    Args:
        x: The sample.
        fraction (float): Top fraction of :func:`top_mass_fraction`.
            Defaults to 0.01.
        fits (dict, optional): Precomputed :func:`fit_all` of ``x``.

    Returns:
        dict: ``num_values``, ``mean``, ``std``, ``kurtosis``,
        ``top_mass`` (with ``top_fraction``), ``fits`` ({family:
        :meth:`DistributionFit.as_dict`}), ``best`` (from
        :func:`select_family`) and ``gg_kurtosis`` (the kurtosis implied by
        the fitted GG shape, a low-variance companion of the sample
        kurtosis for heavy tails).
    """
    values = _checked(x)
    fits = fit_all(values) if fits is None else fits
    gg = fits['generalized-gaussian']
    return {
        'num_values': int(values.size),
        'mean': float(values.mean()),
        'std': float(values.std()),
        'kurtosis': kurtosis(values),
        'top_fraction': float(fraction),
        'top_mass': top_mass_fraction(values, fraction),
        'fits': {name: fit.as_dict() for name, fit in fits.items()},
        'best': select_family(fits),
        'gg_kurtosis': generalized_gaussian_kurtosis(gg.shape),
    }
