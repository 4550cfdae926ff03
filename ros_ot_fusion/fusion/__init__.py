"""From the OT plan to what the user needs: the extrinsic (align) and the fused cloud (fuse)."""
