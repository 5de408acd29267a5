"""Typed errors. Each names what went wrong: the node, the batch, the file, the layer."""

from __future__ import annotations


class LowbitError(Exception):
    """Base class of every error lowbit raises on purpose."""


class CaptureError(LowbitError):
    """torch.export could not capture the model."""


class CalibrationError(LowbitError):
    """A calibration batch is unusable (empty iterable, NaN/Inf, wrong shape or dtype)."""


class QuantConfigError(LowbitError, ValueError):
    """A QuantConfig or override is inconsistent."""


class PlanError(LowbitError, ValueError):
    """A precision plan names an unknown layer or a scheme the target cannot run."""


class ArtifactError(LowbitError):
    """An artifact directory is missing a file, or a file does not match its manifest."""


class BackendNotAvailable(LowbitError, ImportError):
    """The target's runtime library is not installed."""


class PassError(LowbitError):
    """A pass broke a graph invariant (raised by the verify instrument)."""


class InputError(LowbitError, ValueError):
    """A call to a compiled model got inputs of the wrong structure, shape or dtype."""
