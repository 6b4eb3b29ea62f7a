"""Malformed ONNX models (issue #14): each is refused with a reshift error naming what is wrong.

Corrupted initializers, out-of-range attributes and declared sizes over the per-tensor memory
limit (``RESHIFT_MAX_TENSOR_BYTES``), plus the positive side: a valid model still converts.
The random counterpart is tests/test_fuzz_onnx.py.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from reshift import ir
from reshift.errors import ExecutionError, ModelLoadError, ResourceLimitError
from reshift.frontend import from_onnx
from reshift.frontend.onnx_tensors import tensor_to_array
from reshift.ir.limits import MAX_TENSOR_BYTES, max_tensor_bytes

F = TensorProto.FLOAT


def make(nodes, x_shape, initializers, x_type=F) -> onnx.ModelProto:
    """A one-input model ``x -> nodes -> y``, unchecked so that tests can corrupt it first."""
    x, y = helper.make_tensor_value_info("x", x_type, x_shape), helper.make_tensor_value_info("y", F, [1])
    graph = helper.make_graph(nodes, "g", [x], [y], [numpy_helper.from_array(a, n) for n, a in initializers.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def conv_model(weight_dims=(4, 3, 3, 3), **conv_attrs) -> onnx.ModelProto:
    """x[1,3,8,8] -> Conv(w) -> y."""
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv", **conv_attrs)
    return make([node], [1, 3, 8, 8], {"w": np.ones(weight_dims, np.float32)})


def test_valid_model_still_converts():
    graph = from_onnx(conv_model(pads=[1, 1, 1, 1]))
    out = ir.interpret(graph, {"x": np.ones((1, 3, 8, 8), np.float32)})
    assert next(iter(out.values())).shape == (1, 4, 8, 8)


@pytest.mark.parametrize("extra", [3, 37])
def test_raw_data_longer_than_dims_names_initializer(extra):
    model = conv_model()
    model.graph.initializer[0].raw_data += bytes(extra)  # the checker only refuses too little data
    with pytest.raises(ModelLoadError, match=r"initializer 'w': raw_data holds \d+ bytes, but dims"):
        from_onnx(model)


@pytest.mark.parametrize("data_type", [TensorProto.BFLOAT16, TensorProto.INT8, TensorProto.INT16])
def test_wrong_initializer_dtype_names_initializer(data_type):
    model = conv_model()
    model.graph.initializer[0].data_type = data_type
    with pytest.raises(ModelLoadError, match="initializer 'w'"):
        from_onnx(model)


@pytest.mark.parametrize(
    "case",
    [
        dict(data_type=TensorProto.STRING),
        dict(data_type=99),
        dict(dims=[-1, 3]),
        dict(dims=[2**40, 3]),
    ],
)
def test_tensor_to_array_refuses_before_numpy(case):
    tensor = numpy_helper.from_array(np.ones((2, 3), np.float32), "t")
    if "dims" in case:
        del tensor.dims[:]
        tensor.dims.extend(case["dims"])
    else:
        tensor.data_type = case["data_type"]
    with pytest.raises((ModelLoadError, ResourceLimitError), match="initializer 't'"):
        tensor_to_array(tensor, "initializer 't'")


def test_typed_field_length_mismatch_is_named():
    tensor = TensorProto(name="t", data_type=F, dims=[2, 3], float_data=[1.0, 2.0])  # not raw_data
    with pytest.raises(ModelLoadError, match="initializer 't' cannot be read") as info:
        tensor_to_array(tensor, "initializer 't'")
    assert isinstance(info.value.__cause__, ValueError)


@pytest.mark.parametrize(
    "attrs, message",
    [
        (dict(strides=[0, 0]), "stride"),
        (dict(dilations=[0, 1]), "dilation"),
        (dict(pads=[-1, 0, 0, 0]), "padding"),
        (dict(kernel_shape=[3, 3], dilations=[9, 9]), "larger than the padded input"),
        (dict(group=2), "groups=2"),
    ],
)
def test_out_of_range_conv_attributes_name_the_node(attrs, message):
    with pytest.raises(ModelLoadError, match=rf"node 'conv' \(Conv\).*{message}"):
        from_onnx(conv_model(**attrs))


def test_huge_input_dim_is_refused_before_allocation():
    model = conv_model()
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_value = 2**40
    with pytest.raises(ResourceLimitError, match="graph input 'x'.*RESHIFT_MAX_TENSOR_BYTES"):
        from_onnx(model)


def test_constant_of_shape_over_the_limit_names_the_node():
    node = helper.make_node("ConstantOfShape", ["shape"], ["big"], name="fill")
    add = helper.make_node("Add", ["x", "big"], ["y"], name="add")
    model = make([node, add], [1], {"shape": np.array([2**20, 2**20], np.int64)})
    with pytest.raises(ResourceLimitError, match=r"node 'fill' \(ConstantOfShape\)"):
        from_onnx(model)


def test_limit_is_overridable(monkeypatch):
    assert max_tensor_bytes() == MAX_TENSOR_BYTES or "RESHIFT_MAX_TENSOR_BYTES" in __import__("os").environ
    monkeypatch.setenv("RESHIFT_MAX_TENSOR_BYTES", "256")  # the 4x3x3x3 float weight is 432 bytes
    with pytest.raises(ResourceLimitError, match="initializer 'w'"):
        from_onnx(conv_model())
    monkeypatch.setenv("RESHIFT_MAX_TENSOR_BYTES", "not-a-number")
    with pytest.raises(ResourceLimitError, match="not a byte count"):
        max_tensor_bytes()


def test_interpret_refuses_an_intermediate_over_the_limit(monkeypatch):
    graph = ir.parse("graph g(%x: f32[N,64]) {\n  %y: f32[N,64] = relu(%x)\n  return %y\n}")
    x = np.ones((8, 64), np.float32)  # 2 KiB
    monkeypatch.setenv("RESHIFT_MAX_TENSOR_BYTES", "1024")
    with pytest.raises(ResourceLimitError, match=r"node relu_0 \(relu\) output"):
        ir.interpret(graph, {"x": x})


def test_gather_out_of_range_at_run_time_names_the_node():
    graph = ir.parse(
        "graph g(%table: f32[4,2], %ids: i64[3]) {\n  %e: f32[3,2] = gather(%table, %ids) {axis=0}\n  return %e\n}"
    )
    with pytest.raises(ExecutionError, match=r"node gather_0 \(gather\) failed") as info:
        ir.interpret(graph, {"table": np.zeros((4, 2), np.float32), "ids": np.array([0, 9, 1])})
    assert isinstance(info.value.__cause__, IndexError)


def test_gather_with_constant_indices_out_of_range_is_refused_at_import():
    node = helper.make_node("Gather", ["x", "ids"], ["y"], name="pick", axis=1)
    model = make([node], [2, 3], {"ids": np.array([0, 7], np.int64)})
    with pytest.raises(ModelLoadError, match=r"node 'pick' \(Gather\).*out of range for size 3"):
        from_onnx(model)


def test_reduce_with_a_repeated_axis_is_refused_at_import():
    node = helper.make_node("ReduceMax", ["x"], ["y"], name="peak", axes=[0, 0], keepdims=0)
    with pytest.raises(ModelLoadError, match=r"node 'peak' \(ReduceMax\).*axis twice"):
        from_onnx(make([node], [2, 3], {}))


def test_cast_to_an_undefined_element_type_names_the_node():
    node = helper.make_node("Cast", ["x"], ["y"], name="cast", to=99)
    with pytest.raises(ModelLoadError, match=r"node 'cast' \(Cast\)"):
        from_onnx(make([node], [2, 3], {}))


def test_folded_shape_math_reports_the_registry_reason():
    """A Concat of two constants along a missing axis: the op registry's message, not numpy's."""
    node = helper.make_node("Concat", ["a", "b"], ["c"], name="join", axis=3)
    add = helper.make_node("Add", ["x", "c"], ["y"], name="add")
    model = make([node, add], [2], {"a": np.ones(1, np.float32), "b": np.ones(1, np.float32)})
    with pytest.raises(ModelLoadError, match=r"node 'join' \(Concat\).*axis 3 out of range for rank 1"):
        from_onnx(model)


def test_an_empty_dimension_does_not_hide_huge_ones():
    from reshift.ir.limits import check_tensor_size

    check_tensor_size([0, 1024], 4, "small")
    with pytest.raises(ResourceLimitError, match="empty batch"):
        check_tensor_size([0, 2**40], 4, "empty batch")


def test_conv_over_a_batch_dependent_weight_is_refused():
    """MatMul turned Conv in a model with a symbolic batch: the weight's shape holds ``N``."""
    node = helper.make_node("Conv", ["x", "x"], ["y"], name="conv")
    model = make([node], ["batch", 3, 4, 4], {})
    with pytest.raises(ModelLoadError, match=r"node 'conv' \(Conv\).*must be static"):
        from_onnx(model)


def test_reshape_copying_an_axis_the_input_lacks_names_the_node():
    node = helper.make_node("Reshape", ["x", "shape"], ["y"], name="flat")
    model = make([node], [6], {"shape": np.array([2, 0, 3], np.int64)})
    with pytest.raises(ModelLoadError, match=r"node 'flat' \(Reshape\).*copies \(0\) an axis"):
        from_onnx(model)


def test_shape_mismatch_names_the_onnx_node_once_in_its_own_terms():
    node = helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")
    with pytest.raises(ModelLoadError) as info:
        from_onnx(make([node], [2, 4], {"w": np.ones((5, 3), np.float32)}))
    message = str(info.value)
    assert "node 'mm' (MatMul): inner dimensions differ: f32[2,4] @ [5, 3]" in message
    assert message.count("mm") == 1 and "linear" not in message  # not the internal op it becomes


def test_internal_node_prefix_is_dropped_from_converter_errors():
    node = helper.make_node("Gemm", ["x", "w"], ["y"], name="fc", transB=1)
    with pytest.raises(ModelLoadError) as info:
        from_onnx(make([node], [2, 4], {"w": np.ones((3, 5), np.float32)}))
    assert str(info.value).startswith("g: node 'fc' (Gemm): linear: ") and "node fc" not in str(info.value)
