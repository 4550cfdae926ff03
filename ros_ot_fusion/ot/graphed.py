"""Dense Sinkhorn iterations replayed as CUDA graphs.

A dense GPU iteration at the aligner's sizes (8k x 8k) costs ~0.1 ms of kernels but took ~0.5 ms
of Python and launches: the host, not the GPU, set the pace. `graphed_iterations` runs `sinkhorn.iterations` (the k
iterations between two checks, no host sync in them) by replaying a graph captured once.

Graphs are kept per (padded sizes, eps, rho, omega, k): each frame of the aligner has
the same eps and, padded to `CAPACITY` points, one of a few sizes, so after the first frames every
chunk is a replay. A graph reads its inputs from static buffers: the points, weights and potentials
are copied in (padding: copies of the last point, weight 0) and the outputs copied out. The static
buffers are shared, so replays are serialised by a lock (one solving thread is the usual case).
"""
from __future__ import annotations

import threading
import weakref
from collections import OrderedDict

import torch

from ros_ot_fusion.ot.layout import Layout
from ros_ot_fusion.ot.sinkhorn import Problem, iterations

CAPACITY = 1024          # static sizes are rounded up to this many points (fewer distinct graphs)
MAX_GRAPHS = 16          # least recently used graphs beyond this are freed


def _static_layout(n_pad: int, block: int, device) -> Layout:
    return Layout(torch.zeros(3, n_pad, device=device), torch.full((n_pad,), -torch.inf, device=device),
                  None, n_pad, block)


def _identity(layout: Layout):
    """What tells a layout's points and weights apart from any others (a freed tensor's id can
    come back, so weak references; a tensor changed in place has a new version)."""
    return (weakref.ref(layout.pts), layout.pts._version, weakref.ref(layout.logw), layout.logw._version)


def _same(held, layout: Layout) -> bool:
    return (held is not None and held[0]() is layout.pts and held[1] == layout.pts._version
            and held[2]() is layout.logw and held[3] == layout.logw._version)


class _Graph:
    """k iterations captured on static buffers of fixed size."""

    def __init__(self, problem, n_cap: int, m_cap: int, eps, rho, omega, k):
        dev = problem.x.device
        self.x = _static_layout(n_cap, problem.x.block, dev)
        self.y = _static_layout(m_cap, problem.y.block, dev)
        self.f, self.g = torch.zeros(n_cap, device=dev), torch.zeros(m_cap, device=dev)
        static = Problem(self.x, self.y, "triton")
        self.held = [None, None]            # what was loaded into the static layouts last
        self.load(problem, problem.x.logw.new_zeros(problem.x.n_pad), problem.y.logw.new_zeros(problem.y.n_pad))
        run = lambda: iterations(static, self.f, self.g, eps, rho, omega, k)  # noqa: E731
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):          # compile and load the kernels outside the capture
            run()
        torch.cuda.current_stream(dev).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # capture_begin/end, not torch.cuda.graph(): that context first empties the caching
        # allocators (device and pinned host memory), so every capture cost the next
        # allocations their cudaMalloc again
        with torch.cuda.stream(side):
            self.graph.capture_begin(capture_error_mode="thread_local")
            try:
                self.out = run()
            finally:
                self.graph.capture_end()
        torch.cuda.current_stream(dev).wait_stream(side)

    def load(self, problem, f, g) -> None:
        for side, (static, layout, pot, v) in enumerate(((self.x, problem.x, self.f, f),
                                                         (self.y, problem.y, self.g, g))):
            n = layout.n_pad
            pot[:n].copy_(v)
            if _same(self.held[side], layout):
                continue                             # the same points as the last replay's
            static.pts[:, :n].copy_(layout.pts)
            static.pts[:, n:].copy_(layout.pts[:, -1:].expand(3, static.n_pad - n))
            static.logw[:n].copy_(layout.logw)
            static.logw[n:].fill_(-torch.inf)        # an earlier, larger problem left weights there
            self.held[side] = _identity(layout)

    def __call__(self, problem, f, g):
        self.load(problem, f, g)
        self.graph.replay()
        f_out, g_out, f_soft, err = self.out
        n, m = problem.x.n_pad, problem.y.n_pad
        return f_out[:n].clone(), g_out[:m].clone(), f_soft[:n].clone(), err.clone()


_GRAPHS: OrderedDict = OrderedDict()
_SEEN: set = set()      # keys asked for once: captured when asked again
_LOCK = threading.Lock()


def graphed_iterations(problem, f, g, eps: float, rho: float | None, omega: float, k: int):
    """`sinkhorn.iterations`, replayed from a CUDA graph when the problem is dense, on the GPU,
    and on the Triton backend; run directly otherwise. A key is captured the second time it is
    asked for: a cold frame's annealing asks for each of its eps once, warm frames for theirs
    again and again."""
    if (problem.pairs_xy is not None or problem.backend != "triton" or not problem.x.pts.is_cuda
            or CAPACITY % problem.x.block or CAPACITY % problem.y.block):
        return iterations(problem, f, g, eps, rho, omega, k)
    cap = lambda n: -(-n // CAPACITY) * CAPACITY  # noqa: E731
    n_cap, m_cap = cap(problem.x.n_pad), cap(problem.y.n_pad)
    key = (problem.x.device, n_cap, m_cap, problem.x.block, problem.y.block, eps, rho, omega, k)
    with _LOCK:
        graph = _GRAPHS.get(key)
        if graph is None and key not in _SEEN:
            if len(_SEEN) > 64 * MAX_GRAPHS:
                _SEEN.clear()
            _SEEN.add(key)
            return iterations(problem, f, g, eps, rho, omega, k)
        if graph is None:
            _SEEN.discard(key)
            try:
                graph = _Graph(problem, n_cap, m_cap, eps, rho, omega, k)
            except RuntimeError:    # the capture failed (out of memory, say): launch them instead,
                return iterations(problem, f, g, eps, rho, omega, k)   # which raises what is wrong
            _GRAPHS[key] = graph
            while len(_GRAPHS) > MAX_GRAPHS:
                _GRAPHS.popitem(last=False)
        _GRAPHS.move_to_end(key)
        return graph(problem, f, g)
