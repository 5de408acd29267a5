"""The node.meta keys lowbit writes. Defined once, here; every pass reads and writes through these names."""

SPEC = "lowbit_spec"  # LayerSpec: the frozen quantization decision of a linear/conv node (annotate)
LAYER = "lowbit_layer"  # str: the layer's module path, the key of the precision plan (annotate)
CREATED_BY = "lowbit_created_by"  # str: the pass that created the node (the pass manager)
FUSED_ACT = "lowbit_fused_activation"  # str: name of the relu/hardtanh fused into this linear/conv
FUSED_INTO = "lowbit_fused_into"  # str: on the activation node, the layer it is fused into
OBSERVES = "lowbit_observes"  # list[str]: on an observer node, the layers whose input/output it observes
QROLE = "lowbit_qrole"  # str: on lowered q/dq nodes: "act_q", "act_dq", "weight_dq", "token_q", ...

# GraphModule.meta keys (on the module, not a node)
from lowbit.runtime.export.view import PARAM_SOURCES  # noqa: E402,F401  {attr: {"param", "kind"}}: what a pass derived
#   from which parameter of the captured model; a checkpoint export in the model's own names reads it
