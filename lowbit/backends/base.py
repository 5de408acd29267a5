"""The Backend protocol: a name, what it can run, its lowering passes, build, save and load."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from torch import fx

from lowbit.compiler.capture import Captured
from lowbit.compiler.pass_manager import Pass, PassContext
from lowbit.runtime.model import CompiledModel


class Backend(Protocol):
    #: the target name users pass to compile(target=...)
    name: str
    #: the precision schemes it runs (a plan asking for another one is refused, naming the layer)
    schemes: frozenset[str]
    #: relative cost per multiply-accumulate of each scheme it runs (the planner's cost model; 1.0 = w8a8)
    scheme_costs: Mapping[str, float]
    #: the pip extra that installs its runtime, for the "not installed" error
    extra: str | None

    def check_available(self) -> None:
        """Raise BackendNotAvailable, naming the extra to install, if the runtime is missing."""

    def lowering_passes(self, options: dict[str, Any]) -> list[Pass]:
        """Passes run after lower_qdq to shape the graph for this backend."""

    def build(self, gm: fx.GraphModule, ctx: PassContext, captured: Captured, options: dict[str, Any]) -> CompiledModel:
        """Turn the lowered graph into a runnable CompiledModel."""

    def save(self, compiled: CompiledModel, directory: Path) -> None:
        """Write the artifact (temp dir + rename, manifest with hashes)."""

    def load(self, directory: Path, manifest: dict[str, Any], **kwargs: Any) -> CompiledModel:
        """Rebuild a CompiledModel from a verified artifact directory."""
