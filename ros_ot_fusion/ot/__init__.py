"""Entropic optimal transport: log-domain Sinkhorn (dense) and its multi-scale sparse solver."""
from ros_ot_fusion.ot.sinkhorn import SinkhornResult, sinkhorn

__all__ = ["sinkhorn", "SinkhornResult"]
