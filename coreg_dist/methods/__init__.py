"""Method registry: Co-Reg and the baselines share one trainer (see base.py for the interface)."""
from coreg_dist.methods.base import (Batch, DataInfo, Method, Step, build_method, list_methods,
                                     register_method)

__all__ = ["Batch", "DataInfo", "Method", "Step", "build_method", "list_methods", "register_method"]
