"""Which tensors hold NaN or Inf: one rule for pretrained files, trained
weights and checkpoints (torch only)."""
from typing import Any, Dict, List

import torch


def non_finite_tensors(tensors: Dict[str, Any],
                       limit: int = 5) -> List[str]:
    """Names of (at most ``limit``) floating tensors holding NaN or Inf.

    One reduction per tensor (the largest magnitude, which is NaN or Inf
    exactly when the tensor holds one) and one synchronisation overall:
    the maxima are stacked and checked at once, and only when one is not
    finite are the names looked up.

    Args:
        tensors (dict): Name to tensor (a state dict; non-tensors and
            integer tensors are ignored).
        limit (int): How many names to return at most.
    """
    names, peaks = [], []
    for name, value in tensors.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() \
                and value.numel():
            names.append(name)
            peaks.append(value.detach().abs().amax().float())
    if not peaks:
        return []
    device = peaks[0].device
    if bool(torch.isfinite(torch.stack([p.to(device) for p in peaks])).all()):
        return []
    found = []
    for name, peak in zip(names, peaks):
        if not torch.isfinite(peak):
            found.append(name)
            if len(found) == limit:
                break
    return found
