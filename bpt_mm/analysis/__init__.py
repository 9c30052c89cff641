"""Analysis: what the BPT paper measures, on a model and data.

* :mod:`~bpt_mm.analysis.burstiness`: kurtosis, top-1% mass and the
  Gaussian/Laplacian/generalised-Gaussian fits of a sample (numpy, scipy);
* :mod:`~bpt_mm.analysis.token_statistics`: ``X``, ``M``, ``X~`` and the
  whitened ``X~`` of chosen blocks of a backbone over images (torch);
* :mod:`~bpt_mm.analysis.report`: PNG panels, Markdown and JSON of such an
  analysis (matplotlib);
* :mod:`~bpt_mm.analysis.param_budget`: trainable parameters of the BPT
  variants, in the paper's units.

Nothing is imported here, so that importing one module (the prompt
statistics hook needs :func:`~bpt_mm.analysis.burstiness.kurtosis`) does
not load matplotlib.
"""
