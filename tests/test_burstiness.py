"""bpt_mm.analysis.burstiness: kurtosis, top-1% mass and the distribution
fits, on samples drawn from known distributions (10^5 values each)."""
import doctest
import math

import numpy as np
import pytest
import torch
from scipy.stats import gennorm

import bpt_mm.analysis.burstiness as burstiness
from bpt_mm.analysis.burstiness import (FAMILIES, describe, fit_all,
                                        fit_generalized_gaussian,
                                        fit_gaussian, fit_laplacian,
                                        generalized_gaussian_kurtosis,
                                        kurtosis, log_density, select_family,
                                        top_mass_fraction)

N = 100_000
SEEDS = (0, 1, 2)


def sample(kind, seed):
    """(values, true scale, true shape) of a known distribution."""
    rng = np.random.default_rng(seed)
    if kind == 'gaussian':
        return rng.normal(0.5, 2.0, N), 2.0, 2.0
    if kind == 'laplacian':
        return rng.laplace(-1.0, 1.5, N), 1.5, 1.0
    # generalised Gaussian of shape 0.5, scale alpha = 0.7
    return gennorm.rvs(0.5, loc=0.0, scale=0.7, size=N,
                       random_state=rng), 0.7, 0.5


#: kind -> (family the fitter must name, key of the fit holding the scale)
EXPECTED = {
    'gaussian': ('gaussian', 'gaussian'),
    'laplacian': ('laplacian', 'laplacian'),
    'gg05': ('hyper-laplacian', 'generalized-gaussian'),
}


@pytest.mark.parametrize('seed', SEEDS)
@pytest.mark.parametrize('kind', sorted(EXPECTED))
def test_fitter_names_the_family_and_recovers_the_scale(kind, seed):
    values, scale, shape = sample(kind, seed)
    fits = fit_all(values)
    family, key = EXPECTED[kind]
    assert select_family(fits) == family
    assert fits[key].scale == pytest.approx(scale, rel=0.05)
    gg = fits['generalized-gaussian']
    assert gg.shape == pytest.approx(shape, rel=0.05)
    assert not gg.at_bound
    # the GG nests the other two: never a worse likelihood
    assert gg.log_likelihood >= max(fits['gaussian'].log_likelihood,
                                    fits['laplacian'].log_likelihood) - 1e-3


@pytest.mark.parametrize('seed', SEEDS)
@pytest.mark.parametrize('kind', sorted(EXPECTED))
def test_kurtosis_within_ten_percent(kind, seed):
    values, _, shape = sample(kind, seed)
    true = generalized_gaussian_kurtosis(shape)
    stats = describe(values)
    # the kurtosis implied by the fitted shape: every family
    assert stats['gg_kurtosis'] == pytest.approx(true, rel=0.10)
    if kind != 'gg05':
        assert stats['kurtosis'] == pytest.approx(true, rel=0.10)
    # The plug-in kurtosis of shape 0.5 depends on the 8th moment: at 10^5
    # values its spread is ~16% (seeds 0-5 gave 21.3 to 38.0 for 25.2), so
    # no 10% claim is made for it; it must still be clearly heavy-tailed.
    else:
        assert stats['kurtosis'] > 15


def test_known_kurtosis_values():
    assert generalized_gaussian_kurtosis(2.0) == pytest.approx(3.0)
    assert generalized_gaussian_kurtosis(1.0) == pytest.approx(6.0)
    # Gamma(10) Gamma(2) / Gamma(6)^2 = 362880 / 14400
    assert generalized_gaussian_kurtosis(0.5) == pytest.approx(25.2)
    assert kurtosis([1.0, -1.0] * 10) == pytest.approx(1.0)
    assert math.isnan(kurtosis([2.0] * 5))


def test_kurtosis_does_not_depend_on_the_scale():
    # A huge ZCA regulariser (analyze_burstiness --eps 1e300) leaves the
    # whitened tokens near 1e-150: their fourth powers underflowed and the
    # kurtosis came out NaN. Scaling by powers of two is exact, so the
    # value is the same bit for bit on every scale.
    laplace, _, _ = sample('laplacian', 0)
    want = kurtosis(laplace)
    for scale in (2.0 ** -500, 1e-150, 1e150, 2.0 ** 500):
        assert kurtosis(laplace * scale) == pytest.approx(want, rel=1e-12)
    assert kurtosis(laplace * 2.0 ** -500) == want
    assert math.isnan(kurtosis([1e-300] * 4))


def test_top_mass_fraction():
    assert top_mass_fraction([1.0] * 99 + [901.0]) == pytest.approx(0.901)
    assert top_mass_fraction([3.0] * 200) == pytest.approx(0.01)
    # Gaussian: 2 phi(z) / sqrt(2/pi) at the 99% two-sided point z = 2.5758
    gauss, _, _ = sample('gaussian', 0)
    z = 2.5758293
    want = 2 * math.exp(-z * z / 2) / math.sqrt(2 * math.pi) \
        / math.sqrt(2 / math.pi)
    assert top_mass_fraction(np.random.default_rng(0).normal(0, 1, N)) \
        == pytest.approx(want, rel=0.03)
    # heavier tails, more of the mass at the top
    lap, _, _ = sample('laplacian', 0)
    gg, _, _ = sample('gg05', 0)
    assert top_mass_fraction(gauss - 0.5) < top_mass_fraction(lap + 1.0) \
        < top_mass_fraction(gg)
    with pytest.raises(ValueError, match='fraction'):
        top_mass_fraction([1.0, 2.0], fraction=0)


def test_log_density_integrates_to_one_and_matches_the_likelihood():
    values, _, _ = sample('gg05', 0)
    grid = np.linspace(-60, 60, 400_001)
    for fit in fit_all(values).values():
        dens = np.exp(log_density(fit, grid))
        assert np.trapezoid(dens, grid) == pytest.approx(1.0, abs=2e-3)
        assert float(log_density(fit, values).sum()) == pytest.approx(
            fit.log_likelihood, rel=1e-9)


def test_torch_tensors_and_bad_samples():
    t = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    assert fit_gaussian(t).scale == pytest.approx(float(t.std(
        unbiased=False)), rel=1e-6)
    with pytest.raises(ValueError, match='at least'):
        fit_laplacian([1.0, 2.0])
    with pytest.raises(ValueError, match='all values are equal'):
        fit_generalized_gaussian([1.0] * 20)
    with pytest.raises(ValueError, match='non-finite'):
        kurtosis([1.0, float('nan')])
    with pytest.raises(ValueError, match='empty'):
        kurtosis([])
    with pytest.raises(ValueError, match='shape_bounds'):
        fit_generalized_gaussian(np.arange(20.0), shape_bounds=(2.0, 1.0))
    with pytest.raises(ValueError, match='lacks'):
        select_family({'gaussian': fit_gaussian(np.arange(20.0))})


def test_describe_is_json_friendly():
    import json
    values, _, _ = sample('laplacian', 1)
    stats = describe(values[:5000])
    assert stats['best'] in FAMILIES
    json.dumps(stats)  # plain types only


def test_doctests():
    result = doctest.testmod(burstiness)
    assert result.attempted > 5 and result.failed == 0
