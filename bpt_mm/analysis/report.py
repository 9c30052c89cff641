"""Pictures and tables of a burstiness analysis (matplotlib, Agg backend).

:func:`plot_block` draws one PNG per block: one panel per quantity of
:data:`~bpt_mm.analysis.token_statistics.QUANTITIES` (``X``, ``M``, ``X~``
and the whitened ``X~``, the last two side by side), each a histogram of the
values on a log density scale with the three fitted densities drawn over
it.
:func:`markdown_summary` writes the numbers as Markdown tables and
:func:`json_summary` strips the raw samples so the rest can be saved as
JSON.
"""
from typing import Any, Dict, Optional, Tuple

import numpy as np

from .burstiness import DistributionFit, log_density
from .token_statistics import QUANTITIES, QUANTITY_LABELS

__all__ = ['FIGURE_SIZE', 'DPI', 'plot_block', 'markdown_summary',
           'json_summary']

#: Figure size in inches and resolution: PNGs are 1440 x 360 pixels.
FIGURE_SIZE = (16.0, 4.0)
DPI = 90
_STYLES = {
    'gaussian': dict(color='tab:blue', linestyle='--'),
    'laplacian': dict(color='tab:green', linestyle='-.'),
    'generalized-gaussian': dict(color='tab:red', linestyle='-'),
}


def _pyplot():
    # Agg: no display is needed (servers, CI); set before pyplot loads.
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def _fit(entry: Dict[str, Any]) -> DistributionFit:
    return DistributionFit(**entry)


def _panel(ax, values: np.ndarray, stats: Dict[str, Any], title: str,
           bins: int) -> None:
    # A symmetric range about the location keeps both tails in view; the
    # density of a bursty sample spans decades, hence the log scale.
    loc = stats['fits']['laplacian']['loc']
    half = float(np.max(np.abs(values - loc))) or 1.0
    edges = np.linspace(loc - half, loc + half, bins + 1)
    dens, _ = np.histogram(values, bins=edges, density=True)
    centres = (edges[:-1] + edges[1:]) / 2
    ax.bar(centres, dens, width=edges[1] - edges[0], color='0.75',
           edgecolor='none', label='data')
    grid = np.linspace(edges[0], edges[-1], 800)
    floor = max(float(dens[dens > 0].min()) / 10, 1e-300) \
        if (dens > 0).any() else 1e-12
    best = stats['best']
    for name, entry in stats['fits'].items():
        fit = _fit(entry)
        label = {'gaussian': 'Gaussian', 'laplacian': 'Laplacian'}.get(
            name, f'GG shape {fit.shape:.2f}')
        chosen = best == name or (name == 'generalized-gaussian' and best in (
            'hyper-laplacian', 'generalized-gaussian'))
        ax.plot(grid, np.exp(log_density(fit, grid)), linewidth=1.6,
                label=label + (' (best)' if chosen else ''),
                **_STYLES[name])
    ax.set_yscale('log')
    ax.set_ylim(bottom=floor, top=float(dens.max()) * 3)
    ax.set_title(f'{title}\nkurtosis {stats["kurtosis"]:.2f}, top-1% mass '
                 f'{stats["top_mass"]:.3f}, best: {best}', fontsize=9)
    ax.tick_params(labelsize=8)
    ax.legend(fontsize=7, loc='lower center')


def plot_block(result: Dict[str, Any], block: int, path: str,
               title: Optional[str] = None, bins: int = 120
               ) -> Tuple[int, int]:
    """Draw the four panels of one block into a PNG.

    Args:
        result (dict): One block of
            :func:`~bpt_mm.analysis.token_statistics.analyse_backbone`.
        block (int): Its index (for the title).
        path (str): The PNG to write.
        title (str, optional): Prefix of the figure title.
        bins (int): Histogram bins. Defaults to 120.

    Returns:
        tuple[int, int]: The image's width and height in pixels.
    """
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(QUANTITIES), figsize=FIGURE_SIZE,
                             dpi=DPI)
    try:
        for ax, name in zip(axes, QUANTITIES):
            _panel(ax, result['values'][name], result['stats'][name],
                   QUANTITY_LABELS[name], bins)
        head = f'{title}: ' if title else ''
        fig.suptitle(f'{head}block {block}, {result["num_images"]} images, '
                     f'{result["num_tokens"]} tokens (log density)',
                     fontsize=10)
        fig.tight_layout(rect=(0, 0, 1, 0.93))
        fig.savefig(path, dpi=DPI)
        width, height = fig.canvas.get_width_height()
    finally:
        plt.close(fig)
    return int(width), int(height)


def json_summary(results: Dict[int, Dict[str, Any]]) -> Dict[str, Any]:
    """The results without the raw samples, block keys as strings."""
    return {str(block): {k: v for k, v in r.items() if k != 'values'}
            for block, r in sorted(results.items())}


def markdown_summary(results: Dict[int, Dict[str, Any]],
                     header: Dict[str, Any]) -> str:
    """Markdown: the settings, then one table per block.

    Args:
        results (dict):
            :func:`~bpt_mm.analysis.token_statistics.analyse_backbone`
            output.
        header (dict): Settings to list first (config, checkpoint, ...).

    Returns:
        str: The document.
    """
    lines = ['# Burstiness analysis', '']
    lines += [f'- {key}: `{value}`' for key, value in header.items()]
    lines += [
        '', 'Kurtosis is Pearson\'s (3 for a Gaussian); "GG kurtosis" is the '
        'kurtosis implied by the fitted generalised-Gaussian shape. Top-1% '
        'mass is the share of sum |x| in the largest 1% of |x|. The best '
        'family is chosen by BIC; a generalised Gaussian of shape < 1 is '
        'called hyper-Laplacian. Log-likelihoods are per value (nats).', '']
    for block, r in sorted(results.items()):
        lines += [
            f'## Block {block}', '',
            f'{r["num_images"]} images, {r["num_tokens"]} tokens in Sigma '
            f'({r.get("num_dropped_tokens", 0)} padding tokens left out), '
            f'{r["num_tokens_sampled"]} sampled for the distributions. '
            f'Whitening check: ||W Sigma W^T - I||_F / ||I||_F = '
            f'{r["whitening_identity_error"]:.2e} (largest entry '
            f'{r["whitening_identity_max_error"]:.2e}; eps {r["eps"]:g}, '
            f'condition number {r["condition_number"]:.3g}).', '',
            '| quantity | values | kurtosis | GG kurtosis | top-1% mass | '
            'best fit | GG shape | log-lik. Gaussian | Laplacian | GG |',
            '|---|---:|---:|---:|---:|---|---:|---:|---:|---:|'
        ]
        for name in QUANTITIES:
            s = r['stats'][name]
            n = s['num_values']
            ll = {k: f['log_likelihood'] / n for k, f in s['fits'].items()}
            lines.append(
                f'| {QUANTITY_LABELS[name]} | {n:,} | {s["kurtosis"]:.2f} | '
                f'{s["gg_kurtosis"]:.2f} | {s["top_mass"]:.4f} | '
                f'{s["best"]} | '
                f'{s["fits"]["generalized-gaussian"]["shape"]:.3f} | '
                f'{ll["gaussian"]:.4f} | {ll["laplacian"]:.4f} | '
                f'{ll["generalized-gaussian"]:.4f} |')
        lines.append('')
    return '\n'.join(lines)
