"""Triton kernels (installed as ros_ot_fusion.kernels). Each kernel sits beside its torch reference."""
