"""lowbit: a graph-rewriting quantization compiler for PyTorch models.

    import lowbit
    qmodel = lowbit.compile(model, example_inputs, calibration=batches)
    qmodel.save("out/"); lowbit.load("out/", model=model)
"""

__version__ = "0.1.0"

from lowbit.api import compile, load  # noqa: E402
from lowbit.config import QuantConfig  # noqa: E402
from lowbit.errors import (  # noqa: E402
    ArtifactError,
    BackendNotAvailable,
    BackendUnavailable,
    CalibrationError,
    CaptureError,
    EngineError,
    EngineMismatchError,
    ExportError,
    InputError,
    LowbitError,
    PassError,
    PlanError,
    QuantConfigError,
)
from lowbit.runtime.generate import CausalLM  # noqa: E402
from lowbit.runtime.model import CompiledModel  # noqa: E402
from lowbit.runtime.spec import LayerSpec, Plan, QuantSpec  # noqa: E402

__all__ = [
    "compile", "load", "QuantConfig", "CompiledModel", "CausalLM", "Plan", "LayerSpec", "QuantSpec",
    "LowbitError", "CaptureError", "CalibrationError", "QuantConfigError", "PlanError", "ArtifactError",
    "BackendNotAvailable", "BackendUnavailable", "EngineError", "EngineMismatchError", "PassError", "InputError", "ExportError",
]
from lowbit import evaluate  # noqa: E402  perplexity and the offline text/model for LLMs
from lowbit.runtime.layerwise import LayerwiseReport, compare_layers  # noqa: E402

__all__ += ["compare_layers", "LayerwiseReport", "evaluate"]
