"""A network call replayed from a captured CUDA graph, for sampling loops.

A sampler calls the same network on tensors of the same shapes a thousand times; at small batches
on a GPU the launch of its few hundred kernels costs more than their work. :class:`GraphedModel`
captures one call into a CUDA graph and replays it: each call copies its inputs into static
buffers, replays the graph and returns a copy of the static output. Shapes, dtypes, non-tensor
arguments and the autocast state are baked into a capture, so a call that changes any of them
captures again.

Only the network is captured; the sampler's elementwise steps run as usual. The network must not
synchronise with the host inside ``forward`` (ours does not: its checks look at shapes only).

On a device other than CUDA there is nothing to capture, and the same buffer logic runs eagerly
(``forward`` on the static buffers at every call): the tests check the buffer handling that way,
on the CPU, and the GPU run shows the speed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor


class GraphedModel:
    """``model(x, t, **kwargs)`` through a CUDA graph; see the module docstring.

    Args:
        model: the network, in eval mode; its parameters must stay where they are (the graph reads
            their memory).
        warmup: eager calls on a side stream before capturing (cuDNN picks its kernels, lazy
            buffers are allocated), as PyTorch's CUDA-graph notes advise.
    """

    def __init__(self, model: Callable[..., Tensor], warmup: int = 3) -> None:
        self.model = model
        self.warmup = warmup
        self.captures = 0
        self._key: tuple | None = None
        self._inputs: dict[str, Tensor] = {}
        self._constants: dict[str, Any] = {}
        self._output: Tensor | None = None
        self._replay: Callable[[], None] | None = None
        self._graph: torch.cuda.CUDAGraph | None = None

    def __call__(self, x: Tensor, t: Tensor, **kwargs: Any) -> Tensor:
        inputs = {"x": x, "t": t, **{k: v for k, v in kwargs.items() if isinstance(v, Tensor)}}
        constants = {k: v for k, v in kwargs.items() if not isinstance(v, Tensor)}
        device_type = x.device.type
        # Autocast decides the kernels a capture records, so its state is part of the key.
        autocast = (torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
        key = (tuple((k, tuple(v.shape), v.dtype, v.device) for k, v in inputs.items()),
               tuple(sorted(constants.items())), autocast)
        if key != self._key:
            self._capture(inputs, constants)
            self._key = key
        for name, value in inputs.items():
            self._inputs[name].copy_(value)
        self._replay()
        # A copy: the next replay overwrites the static output, and a caller may still hold this one.
        return self._output.clone()

    def _call_static(self) -> Tensor:
        static = self._inputs
        extra = {k: v for k, v in static.items() if k not in ("x", "t")}
        return self.model(static["x"], static["t"], **extra, **self._constants)

    def _capture(self, inputs: dict[str, Tensor], constants: dict[str, Any]) -> None:
        self._inputs = {name: value.clone() for name, value in inputs.items()}
        self._constants = dict(constants)
        self.captures += 1
        if inputs["x"].device.type != "cuda":
            self._output = self._call_static()
            self._replay = lambda: self._output.copy_(self._call_static())
            return
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), _no_autocast_cache():
            for _ in range(self.warmup):
                self._call_static()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with _no_autocast_cache(), torch.cuda.graph(graph):
            self._output = self._call_static()
        self._graph = graph  # kept alive: it owns the memory the static output lives in
        self._replay = graph.replay


def _no_autocast_cache() -> contextlib.AbstractContextManager:
    """CUDA autocast as it stands, without its cache of cast weights.

    Autocast keeps the bf16 copies of the weights it casts until its outermost context exits. A
    graph captured with a warm cache would read those copies without recording the casts, and
    replay them after a later exit had freed them; without the cache the casts are recorded (as
    PyTorch's CUDA-graph notes ask of autocast).
    """
    if not torch.is_autocast_enabled("cuda"):
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False)
