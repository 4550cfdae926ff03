"""Opcode histogram of the soft-min kernel's SASS (what one pair costs), for a given tile config.

    python bench/sass_softmin.py [BM BN WARPS EXACT]
"""
import collections
import re
import sys

import torch

from ros_ot_fusion.kernels.softmin import _softmin_kernel, column_blocks, LOG2E

bm, bn, warps, exact = (int(a) for a in sys.argv[1:5]) if len(sys.argv) > 4 else (128, 32, 2, 0)
n = 8192
x = torch.randn(3, n, device="cuda")
h = torch.randn(n, device="cuda")
out = torch.empty(n, device="cuda")
k = _softmin_kernel[(n // bm, 1)](x, *column_blocks(x, 128), h, out, out, out, out, n, n, LOG2E / 0.01, LOG2E,
                                   SPARSE=False, BLOCK=128, BLOCK_M=bm, BLOCK_N=bn, SPLIT=1, FTZ=True,
                                   EXACT=bool(exact),
                                num_warps=warps)
print("registers", k.n_regs, "spills", k.n_spills, "shared", k.metadata.shared)
import os, subprocess, tempfile
cubin = os.path.join(tempfile.mkdtemp(), "k.cubin")
open(cubin, "wb").write(k.asm["cubin"])
sass = subprocess.run(["cuobjdump", "-sass", cubin], capture_output=True, text=True).stdout
ops = re.findall(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P[T\d]\s+)?([A-Z][A-Z0-9_.]*)", sass)
print("instructions", len(ops))
hist = collections.Counter(o.split(".")[0] for o in ops)
print(sorted(hist.items(), key=lambda kv: -kv[1])[:25])
open(f"/tmp/softmin_{bm}_{bn}_{warps}_{exact}.sass", "w").write(sass)
