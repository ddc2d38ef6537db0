"""Method registry: Co-Reg and the baselines share one trainer (base.py: the interface;
registry.py: registration and discovery; one module per method)."""
from coreg_dist.methods.base import (Batch, BatchPart, DataInfo, Method, PassRng, StepOutput,
                                     build_method, per_stream)
from coreg_dist.methods.registry import get_method, list_methods, register_method

__all__ = ["Batch", "BatchPart", "DataInfo", "Method", "PassRng", "StepOutput", "build_method",
           "get_method", "list_methods", "per_stream", "register_method"]
