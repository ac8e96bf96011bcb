"""Reference statistics computed by torch in float64, for the audit tests of both kernels."""

from __future__ import annotations

import torch


def reference(x: torch.Tensor) -> dict:
    """min / max ignore NaN (so +-inf count); moments, norm and sumsq use the finite values;
    complex tensors count their real and imaginary parts."""
    if x.is_complex():
        x = torch.view_as_real(x)
    x = x.reshape(-1).double()
    not_nan = x[~x.isnan()]
    fin = x[torch.isfinite(x)]
    return {
        "min": not_nan.min().item() if not_nan.numel() else None,
        "max": not_nan.max().item() if not_nan.numel() else None,
        "mean": fin.mean().item() if fin.numel() else None,
        "std": fin.std(correction=0).item() if fin.numel() else None,
        "var": fin.var(correction=0).item() if fin.numel() else None,
        "norm": torch.linalg.vector_norm(fin).item(),
        "sumsq": float((fin * fin).sum()),
        "zeros": int((x == 0).sum()),
        "nan": int(x.isnan().sum()),
        "inf": int(x.isinf().sum()),
        "finite": int(fin.numel()),
    }
