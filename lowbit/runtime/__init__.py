"""Runtime: qparam math (the oracle), observers, artifacts. Never imports lowbit.compiler or lowbit.passes."""
