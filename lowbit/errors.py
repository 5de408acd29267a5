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
    """An artifact cannot be loaded: a file is missing, does not match its manifest, cannot be parsed, or
    names a path outside the artifact directory. ``lowbit.load`` raises nothing else for a bad artifact."""


class BackendUnavailable(LowbitError, ImportError):
    """The target's runtime library (or the device it needs) is not available.

    ``artifact_dir`` is set when compile() wrote what it could before raising (target "tensorrt-int8"
    without TensorRT or a GPU: the TensorRT-ready ONNX and its conformance report).
    """

    artifact_dir = None  # pathlib.Path | None


#: the name this error had before ``BackendUnavailable``; both names are the same class
BackendNotAvailable = BackendUnavailable


class EngineMismatchError(ArtifactError):
    """A serialized engine was built for another GPU or engine version than the one loading it."""


class PassError(LowbitError):
    """A pass broke a graph invariant (raised by the verify instrument)."""


class InputError(LowbitError, ValueError):
    """A call to a compiled model got inputs of the wrong structure, shape or dtype."""


class ExportError(LowbitError):
    """A compiled model cannot be written in the requested checkpoint format (compressed-tensors, GGUF): names
    the layer or parameter and what the format can hold instead."""


class EngineError(LowbitError, RuntimeError):
    """The engine (ONNX Runtime, OpenVINO, TensorRT) failed on a call: its message (which names the node) and the
    call's inputs, instead of the engine's own exception type."""
