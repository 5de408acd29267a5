"""Observers: ``forward`` collects statistics, ``calculate_qparams`` returns (scale, zero_point).

All observers stream: their state is a running min/max and, for the histogram methods, a fixed number of
bins over a symmetric range [-R, R] that doubles when a batch exceeds it (pairs of bins merge exactly), so
memory stays bounded whatever number of batches is given.

Range selection, on that histogram:
- ``minmax``: the observed min and max.
- ``percentile``: clip both tails at the given percentile of the value distribution.
- ``entropy``: TensorRT's KL calibration: over candidate thresholds t on the |x| histogram, keep the t
  whose 128-level quantized distribution Q is closest (KL(P || Q)) to the clipped reference P.
- ``mse``: the clipping range that minimises the expected squared quantization error.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from lowbit.runtime.qparams import choose_qparams
from lowbit.runtime.spec import QuantSpec

METHODS = ("minmax", "percentile", "entropy", "mse")


class Observer(nn.Module):
    """Per-tensor activation observer. Identity in the graph; statistics on the side."""

    def __init__(self, spec: QuantSpec) -> None:
        super().__init__()
        self.spec = spec
        self.min_val = float("inf")
        self.max_val = float("-inf")
        self.num_batches = 0
        self.fixed: tuple[float, int] | None = None  # qparams loaded from an artifact

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fixed is None and x.numel() and x.is_floating_point():
            xd = x.detach()
            self.min_val = min(self.min_val, float(xd.min()))
            self.max_val = max(self.max_val, float(xd.max()))
            self.num_batches += 1
            self.observe(xd)
        return x

    def observe(self, x: torch.Tensor) -> None:  # extra statistics, for subclasses
        return None

    def select_range(self) -> tuple[float, float]:
        return self.min_val, self.max_val

    @property
    def observed(self) -> bool:
        return self.fixed is not None or self.num_batches > 0

    def calculate_qparams(self) -> tuple[float, int]:
        if self.fixed is not None:
            return self.fixed
        lo, hi = self.select_range() if self.num_batches else (0.0, 0.0)
        scale, zp = choose_qparams(torch.tensor(lo), torch.tensor(hi), self.spec)
        return float(scale), int(zp)

    def extra_repr(self) -> str:
        return f"{type(self).__name__[:-8].lower()}, {self.spec.dtype}, range=[{self.min_val:.4g}, {self.max_val:.4g}]"


class MinMaxObserver(Observer):
    pass


#: hardsigmoid's output [0, 1] on uint8 with 1.0 a code (scale, zero point): hardswish's quantized gate
HARDSIGMOID_QPARAMS = (1.0 / 255.0, 0)


class FixedQParamsObserver(Observer):
    """An output whose range the op itself fixes (hardsigmoid's [0, 1]): its qparams are given, never
    calibrated -- PyTorch's ``FixedQParamsObserver`` for hardsigmoid and sigmoid (there 1/256 on quint8; here
    1/255, so 1.0 is a code). They sit where an artifact's loaded qparams do (``fixed``)."""

    def __init__(self, spec: QuantSpec, scale: float, zero_point: int) -> None:
        super().__init__(spec)
        self.fixed = (float(scale), int(zero_point))


class HistogramObserver(Observer):
    """Keeps ``bins`` counts over [-R, R]; R doubles (merging bin pairs) when data exceeds it."""

    def __init__(self, spec: QuantSpec, bins: int = 2048) -> None:
        super().__init__(spec)
        if bins % 4:
            raise ValueError("histogram bins must be a multiple of 4")
        self.bins = bins
        self.hist = np.zeros(bins, dtype=np.float64)
        self.radius = 0.0

    def observe(self, x: torch.Tensor) -> None:
        amax = max(abs(self.min_val), abs(self.max_val))
        if amax == 0.0:
            self.hist[self.bins // 2] += x.numel()  # all zeros so far: count them at zero
            return
        if self.radius == 0.0:
            # first non-zero batch: earlier zeros sit in the centre bin, which stays the centre bin
            self.radius = amax
        while amax > self.radius:
            self._double()
        h = torch.histc(x.float().flatten(), bins=self.bins, min=-self.radius, max=self.radius)
        self.hist += h.double().numpy()

    def _double(self) -> None:
        """Double the radius: bin pairs merge into the centre half, exactly."""
        merged = self.hist.reshape(-1, 2).sum(axis=1)
        new = np.zeros_like(self.hist)
        q = self.bins // 4
        new[q : q + merged.size] = merged
        self.hist = new
        self.radius *= 2.0

    # helpers over the histogram -------------------------------------------------------------------
    def _edges(self) -> np.ndarray:
        return np.linspace(-self.radius, self.radius, self.bins + 1)

    def _centers(self) -> np.ndarray:
        e = self._edges()
        return 0.5 * (e[:-1] + e[1:])

    def _abs_hist(self) -> tuple[np.ndarray, float]:
        """|x| histogram over [0, R] with bins/2 bins (the signed one folded at zero)."""
        half = self.bins // 2
        return self.hist[half:] + self.hist[:half][::-1], self.radius / half

    def _clip(self, lo: float, hi: float) -> tuple[float, float]:
        return max(lo, self.min_val), min(hi, self.max_val)


class PercentileObserver(HistogramObserver):
    def __init__(self, spec: QuantSpec, percentile: float = 99.99, bins: int = 2048) -> None:
        super().__init__(spec, bins)
        if not 50.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {percentile}")
        self.percentile = percentile

    def select_range(self) -> tuple[float, float]:
        if self.radius == 0.0:
            return self.min_val, self.max_val
        p = self.percentile / 100.0
        if self.spec.symmetric:
            h, width = self._abs_hist()
            cdf = np.cumsum(h) / h.sum()
            t = (int(np.searchsorted(cdf, p)) + 1) * width
            return self._clip(-t, t)
        cdf = np.cumsum(self.hist) / self.hist.sum()
        e = self._edges()
        lo = e[int(np.searchsorted(cdf, 1.0 - p))]
        hi = e[min(int(np.searchsorted(cdf, p)) + 1, self.bins)]
        return self._clip(float(lo), float(hi))


class EntropyObserver(HistogramObserver):
    """TensorRT's entropy calibration (KL divergence over an |x| histogram, 128 target levels)."""

    def __init__(self, spec: QuantSpec, bins: int = 2048, levels: int = 128) -> None:
        super().__init__(spec, bins)
        self.levels = levels

    def select_range(self) -> tuple[float, float]:
        if self.radius == 0.0:
            return self.min_val, self.max_val
        h, width = self._abs_hist()
        # a spike at zero (ReLU outputs, padding, an all-zero batch) would dominate the KL: merging it with
        # its neighbours into one quantized bin smears it, so every wider threshold looks worse and the
        # search clips far too tight. Count the zero bin like its neighbour (NVIDIA pytorch-quantization's
        # _compute_amax_entropy does the same: bins[0] = bins[1]).
        h = h.copy()
        h[0] = h[1]
        n = h.size
        best_i, best_kl = n, np.inf
        for i in range(min(self.levels, n), n + 1):
            kl = self._divergence(h, i)
            if kl < best_kl:
                best_kl, best_i = kl, i
        t = best_i * width
        return self._clip(-t, t)

    def _divergence(self, h: np.ndarray, i: int) -> float:
        """KL(P || Q) for the threshold at bin i (MXNet/TensorRT: outliers clipped into P's last bin,
        Q = the first i bins merged into `levels` bins and spread back over P's non-empty bins)."""
        sliced = h[:i]
        p = sliced.copy()
        p[-1] += h[i:].sum()
        nonzero = p != 0
        idx = (np.arange(i) * self.levels) // i
        merged = np.bincount(idx, weights=sliced, minlength=self.levels)
        norm = np.bincount(idx, weights=nonzero.astype(np.float64), minlength=self.levels)
        q = np.where(nonzero, merged[idx] / np.maximum(norm[idx], 1.0), 0.0)
        p, q = _smooth(p), _smooth(q)
        if p is None or q is None:
            return np.inf
        p, q = p / p.sum(), q / q.sum()
        return float(np.sum(p * np.log(p / q)))


def _smooth(d: np.ndarray, eps: float = 1e-4) -> np.ndarray | None:
    """Move a little mass onto empty bins so KL stays finite (MXNet's _smooth_distribution)."""
    zero = d == 0
    n_zero, n_nonzero = int(zero.sum()), int(d.size - zero.sum())
    if n_nonzero == 0:
        return None
    out = d.astype(np.float64) + eps * zero - (eps * n_zero / n_nonzero) * (~zero)
    return out if (out > 0).all() else None


class MSEObserver(HistogramObserver):
    """Picks the clipping range minimising the expected squared quantization error on the histogram."""

    def __init__(self, spec: QuantSpec, bins: int = 2048, grid: int = 48) -> None:
        super().__init__(spec, bins)
        self.grid = grid

    def select_range(self) -> tuple[float, float]:
        if self.radius == 0.0:
            return self.min_val, self.max_val
        c, w = self._centers(), self.hist
        keep = w > 0
        c, w = c[keep], w[keep]
        fractions = np.geomspace(0.01, 1.0, self.grid)  # outliers can sit 100x above the bulk
        if self.spec.symmetric:
            amax = max(abs(self.min_val), abs(self.max_val))
            lo = -fractions * amax
            hi = fractions * amax
        else:
            fl, fh = np.meshgrid(fractions, fractions, indexing="ij")
            lo, hi = (fl * min(self.min_val, 0.0)).ravel(), (fh * max(self.max_val, 0.0)).ravel()
        scale, zp = choose_qparams(torch.from_numpy(lo), torch.from_numpy(hi), self.spec)
        s, z = scale.double().numpy()[:, None], zp.double().numpy()[:, None]
        q = np.clip(np.round(c[None, :] / s) + z, self.spec.qmin, self.spec.qmax)
        err = ((c[None, :] - (q - z) * s) ** 2 * w[None, :]).sum(axis=1)
        k = int(np.argmin(err))
        return float(lo[k]), float(hi[k])


def make_observer(spec: QuantSpec, method: str = "minmax", *, percentile: float = 99.99, bins: int = 2048) -> Observer:
    """Build the observer for a calibration method."""
    if method == "minmax":
        return MinMaxObserver(spec)
    if method == "percentile":
        return PercentileObserver(spec, percentile=percentile, bins=bins)
    if method == "entropy":
        return EntropyObserver(spec, bins=bins)
    if method == "mse":
        return MSEObserver(spec, bins=bins)
    raise ValueError(f"unknown calibration method {method!r}; known: {', '.join(METHODS)}")
