"""One pass per file, named after it. The default order is in lowbit/compiler/pipeline.py."""

from lowbit.passes.annotate import Annotate
from lowbit.passes.awq import AWQ
from lowbit.passes.bias_correction import BiasCorrection
from lowbit.passes.calibrate import Calibrate
from lowbit.passes.canonicalize import Canonicalize
from lowbit.passes.fold_conv_bn import FoldConvBatchNorm
from lowbit.passes.fuse_activation import FuseActivation
from lowbit.passes.fuse_linear_bias import FuseLinearBias
from lowbit.passes.gptq import GPTQ
from lowbit.passes.insert_observers import InsertObservers
from lowbit.passes.lower_qdq import LowerQDQ
from lowbit.passes.quantize_embeddings import QuantizeEmbeddings
from lowbit.passes.smooth_quant import SmoothQuant

__all__ = [
    "Annotate", "AWQ", "BiasCorrection", "Calibrate", "Canonicalize", "FoldConvBatchNorm", "FuseActivation", "FuseLinearBias", "GPTQ",
    "InsertObservers", "LowerQDQ", "QuantizeEmbeddings", "SmoothQuant",
]
