"""Cross-layer equalization (Nagel et al. 2019, https://arxiv.org/abs/1906.04721) of fused conv pairs.

A pair is ``Conv -> Relu -> Conv`` in the ONNX graph with nothing else reading the tensors between: ReLU
is positively homogeneous (``relu(x / s) = relu(x) / s`` for ``s > 0``), so dividing the first conv's
output channel ``i`` (weights and bias) by ``s_i`` and multiplying the second conv's input channel ``i``
by ``s_i`` leaves the function unchanged, while ``s_i = sqrt(r1_i / r2_i)`` (``r``: the channels' largest
|weight|) gives both channels the same range. In a fused MobileOne model the pairs are a block's
depthwise conv -> ReLU -> the next block's pointwise conv and back; SiLU (not homogeneous) and
squeeze-excite (its gate reads the scaled tensor) end a chain, so no such pair is formed there.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import numpy_helper


def _group(node: onnx.NodeProto) -> int:
    return next((a.i for a in node.attribute if a.name == "group"), 1)


def private_constants(model: onnx.ModelProto) -> None:
    """Gives every Conv its own weight and bias initializers (in place).

    The TorchScript exporter stores equal constants once and hands them on through ``Identity`` nodes (a
    fresh model's zero biases, say); scaling one conv's copy must not scale another's.
    """
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    for node in [n for n in graph.node if n.op_type == "Identity" and n.input[0] in inits]:
        copy = onnx.TensorProto()
        copy.CopyFrom(inits[node.input[0]])
        copy.name = node.output[0]
        graph.initializer.append(copy)
        inits[copy.name] = copy
        graph.node.remove(node)
    used: dict[str, int] = defaultdict(int)
    for node in graph.node:
        for name in node.input:
            used[name] += 1
    for node in graph.node:
        if node.op_type != "Conv":
            continue
        for k in range(1, len(node.input)):
            name = node.input[k]
            if name in inits and used[name] > 1:
                copy = onnx.TensorProto()
                copy.CopyFrom(inits[name])
                copy.name = f"{name}/{node.name}"
                graph.initializer.append(copy)
                inits[copy.name] = copy
                used[name] -= 1
                node.input[k] = copy.name


def conv_relu_conv_pairs(model: onnx.ModelProto) -> list[tuple[onnx.NodeProto, onnx.NodeProto]]:
    """The equalizable ``(first conv, second conv)`` pairs of the graph, in graph order."""
    graph = model.graph
    consumers: dict[str, list] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
    inits = {i.name: i for i in graph.initializer}
    outputs = {o.name for o in graph.output}
    pairs = []
    for conv in graph.node:
        if conv.op_type != "Conv" or conv.output[0] in outputs:
            continue
        relus = consumers[conv.output[0]]
        if len(relus) != 1 or relus[0].op_type != "Relu" or relus[0].output[0] in outputs:
            continue
        nexts = consumers[relus[0].output[0]]
        if len(nexts) != 1 or nexts[0].op_type != "Conv" or nexts[0].input[0] != relus[0].output[0]:
            continue
        second = nexts[0]
        names = [conv.input[1], second.input[1], *(conv.input[2:3])]
        if not all(n in inits and len(consumers[n]) == 1 for n in names):
            continue  # weights that are not constants of these convs alone
        channels = numpy_helper.to_array(inits[conv.input[1]]).shape[0]
        w2 = numpy_helper.to_array(inits[second.input[1]])
        if _group(second) == 1 or (_group(second) == channels and w2.shape[1] == 1):
            pairs.append((conv, second))
    return pairs


def _ranges(w1: np.ndarray, w2: np.ndarray, depthwise: bool) -> tuple[np.ndarray, np.ndarray]:
    r1 = np.abs(w1).reshape(w1.shape[0], -1).max(1)
    r2 = np.abs(w2).reshape(w2.shape[0], -1).max(1) if depthwise else np.abs(w2).max(axis=(0, 2, 3))
    return r1, r2


def equalize(model: onnx.ModelProto, sweeps: int = 4) -> list[dict]:
    """Equalizes every pair of ``model`` in place (``sweeps`` passes over chains); one record per pair."""
    private_constants(model)
    inits = {i.name: i for i in model.graph.initializer}
    arrays = {}
    pairs = conv_relu_conv_pairs(model)
    for c1, c2 in pairs:
        for name in [c1.input[1], c2.input[1], *c1.input[2:3]]:
            arrays[name] = numpy_helper.to_array(inits[name]).astype(np.float64)
    scales = {id(c1): np.ones(1) for c1, _ in pairs}
    before = {}
    for c1, c2 in pairs:
        r1, _ = _ranges(arrays[c1.input[1]], arrays[c2.input[1]], _group(c2) > 1)
        before[id(c1)] = float(r1.max() / max(r1.min(), 1e-30))
    for _ in range(sweeps):
        for c1, c2 in pairs:
            w1, w2 = arrays[c1.input[1]], arrays[c2.input[1]]
            depthwise = _group(c2) > 1
            r1, r2 = _ranges(w1, w2, depthwise)
            s = np.where((r1 > 0) & (r2 > 0), np.sqrt(r1 / np.where(r2 > 0, r2, 1)), 1.0)
            w1 /= s[:, None, None, None]
            if len(c1.input) > 2:
                arrays[c1.input[2]] /= s
            w2 *= s[:, None, None, None] if depthwise else s[None, :, None, None]
            scales[id(c1)] = scales[id(c1)] * s
    for name, array in arrays.items():
        dtype = numpy_helper.to_array(inits[name]).dtype
        inits[name].CopyFrom(numpy_helper.from_array(array.astype(dtype), name))
    records = []
    for c1, c2 in pairs:
        r1, _ = _ranges(arrays[c1.input[1]], arrays[c2.input[1]], _group(c2) > 1)
        s = scales[id(c1)]
        records.append(
            {
                "conv1": c1.name,
                "conv2": c2.name,
                "channels": int(s.size),
                "scale_min": float(s.min()),
                "scale_max": float(s.max()),
                "conv1_channel_range_ratio_before": before[id(c1)],
                "conv1_channel_range_ratio_after": float(r1.max() / max(r1.min(), 1e-30)),
            }
        )
    return records
