"""ONNX Resize (and Upsample through the opset upgrade) against onnxruntime: interpreter and CPU build."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import reshift
from reshift.errors import ModelLoadError
from reshift.frontend import from_onnx
from reshift.ir import interpret

F = TensorProto.FLOAT


def resize_model(in_hw, scales=None, sizes=None, opset=13, roi=(), **attrs) -> onnx.ModelProto:
    inits = [numpy_helper.from_array(np.asarray(roi, np.float32), "roi")]
    names = ["x", "roi"]
    if scales is not None:
        inits.append(numpy_helper.from_array(np.asarray(scales, np.float32), "scales"))
        names.append("scales")
    if sizes is not None:
        names += [""] if scales is None else []
        inits.append(numpy_helper.from_array(np.asarray(sizes, np.int64), "sizes"))
        names.append("sizes")
    node = helper.make_node("Resize", names, ["y"], **attrs)
    graph = helper.make_graph(
        [node],
        "resize",
        [helper.make_tensor_value_info("x", F, [1, 2, *in_hw])],
        [helper.make_tensor_value_info("y", F, None)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return with_inferred_output(model)


def with_inferred_output(model: onnx.ModelProto) -> onnx.ModelProto:
    """The output's type from ONNX shape inference (``make_tensor_value_info(..., None)`` has none)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    model.graph.output[0].type.CopyFrom(inferred.graph.output[0].type)
    return model


def run_ort(model, x):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


CASES = {
    "nearest_asymmetric_floor": dict(
        scales=[1, 1, 2, 2], mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor"
    ),
    "nearest_default": dict(scales=[1, 1, 2, 2]),
    "nearest_half_pixel_ceil": dict(sizes=[1, 2, 7, 10], mode="nearest", nearest_mode="round_prefer_ceil"),
    "nearest_align_corners_down": dict(
        sizes=[1, 2, 3, 4], mode="nearest", coordinate_transformation_mode="align_corners"
    ),
    "linear_half_pixel": dict(scales=[1, 1, 2, 2], mode="linear"),
    "linear_pytorch_half_pixel": dict(
        sizes=[1, 2, 9, 5], mode="linear", coordinate_transformation_mode="pytorch_half_pixel"
    ),
    "linear_align_corners": dict(sizes=[1, 2, 8, 11], mode="linear", coordinate_transformation_mode="align_corners"),
    "cubic_half_pixel": dict(scales=[1, 1, 2, 2], mode="cubic"),
    "cubic_fractional_scales": dict(scales=[1, 1, 0.7, 1.45], mode="cubic"),  # sampled at 1 / scale
    "linear_antialias_down": dict(sizes=[1, 2, 2, 4], mode="linear", antialias=1, opset=18),
    "cubic_antialias_exclude_outside": dict(
        scales=[1, 1, 0.6, 0.5], mode="cubic", antialias=1, exclude_outside=1, cubic_coeff_a=-0.5, opset=18
    ),
    "cubic_half_pixel_symmetric": dict(
        scales=[1, 1, 2.3, 0.7], mode="cubic", coordinate_transformation_mode="half_pixel_symmetric", opset=19
    ),
    "nearest_fractional_scales_asymmetric": dict(
        scales=[1, 1, 1.7, 0.55], coordinate_transformation_mode="asymmetric", nearest_mode="floor"
    ),
    "cubic_exclude_outside_tf_coefficient": dict(
        sizes=[1, 2, 9, 4], mode="cubic", cubic_coeff_a=-0.5, exclude_outside=1
    ),
    "cubic_pytorch_half_pixel_to_one": dict(
        sizes=[1, 2, 1, 3], mode="cubic", coordinate_transformation_mode="pytorch_half_pixel"
    ),
    "cubic_align_corners": dict(sizes=[1, 2, 3, 11], mode="cubic", coordinate_transformation_mode="align_corners"),
    "cubic_asymmetric": dict(sizes=[1, 2, 7, 8], mode="cubic", coordinate_transformation_mode="asymmetric"),
    # onnxruntime leaves an axis whose size does not change uncropped; both axes change here
    "cubic_tf_crop_and_resize": dict(
        sizes=[1, 2, 4, 9],
        mode="cubic",
        coordinate_transformation_mode="tf_crop_and_resize",
        roi=[0, 0, -0.2, 0.1, 1, 1, 0.9, 1.3],
        extrapolation_value=-7.0,
    ),
    "linear_tf_crop_and_resize": dict(
        sizes=[1, 2, 8, 3],
        mode="linear",
        coordinate_transformation_mode="tf_crop_and_resize",
        roi=[0, 0, 0.2, 0.3, 1, 1, 0.7, 0.9],
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_resize_matches_onnxruntime(case):
    model = resize_model((5, 6), **CASES[case])
    x = np.random.default_rng(0).standard_normal((1, 2, 5, 6)).astype(np.float32)
    want = run_ort(model, x)
    got = interpret(from_onnx(model), {"x": x})["y"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_nearest_tf_crop_and_resize_matches_the_onnx_reference():
    """onnxruntime rounds some ties of the cropped coordinate the other way; ONNX's reference is the spec."""
    from onnx.reference import ReferenceEvaluator

    roi = [0, 0, -0.2, 0.1, 1, 1, 0.9, 1.3]
    model = resize_model((5, 6), sizes=[1, 2, 9, 13], coordinate_transformation_mode="tf_crop_and_resize", roi=roi)
    x = np.random.default_rng(0).standard_normal((1, 2, 5, 6)).astype(np.float32)
    want = ReferenceEvaluator(model).run(None, {"x": x})[0]
    np.testing.assert_array_equal(interpret(from_onnx(model), {"x": x})["y"], want)


@pytest.mark.slow
def test_resize_builds_for_cpu():
    x = np.random.default_rng(1).standard_normal((1, 2, 5, 6)).astype(np.float32)
    for case in (
        "nearest_asymmetric_floor",
        "linear_half_pixel",
        "cubic_exclude_outside_tf_coefficient",
        "linear_antialias_down",
    ):
        model = resize_model((5, 6), **CASES[case])
        np.testing.assert_allclose(reshift.compile(model, target="cpu")(x), run_ort(model, x), rtol=1e-5, atol=1e-6)


def test_upsample_from_opset_9_is_upgraded():
    scales = numpy_helper.from_array(np.asarray([1, 1, 2, 3], np.float32), "scales")
    node = helper.make_node("Upsample", ["x", "scales"], ["y"], mode="nearest")
    graph = helper.make_graph(
        [node],
        "up",
        [helper.make_tensor_value_info("x", F, [1, 2, 3, 4])],
        [helper.make_tensor_value_info("y", F, None)],
        [scales],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)])
    model.ir_version = 7
    model = with_inferred_output(model)
    x = np.random.default_rng(2).standard_normal((1, 2, 3, 4)).astype(np.float32)
    np.testing.assert_array_equal(interpret(from_onnx(model), {"x": x})["y"], run_ort(model, x))


@pytest.mark.parametrize(
    "kwargs, reason",
    [
        (dict(scales=[1, 1, 2, 2], mode="lanczos"), "mode 'lanczos' is not supported"),
        (dict(scales=[1, 1, 2, 2], mode="linear", exclude_outside=1), "exclude_outside=1 with mode 'linear'"),
        (dict(scales=[1, 1, 2, 2], mode="nearest", antialias=1, opset=18), "antialias=1 with mode 'nearest'"),
        (dict(scales=[1, 1, 2, 2], coordinate_transformation_mode="tf_crop_and_resize"), "needs a constant roi"),
        (dict(scales=[1, 2, 2, 2]), "change the batch or channel axis"),
        (dict(scales=[1, 1, 1.5, 1.5], coordinate_transformation_mode="align_corners"), "not whole output sizes"),
        (dict(scales=[1, 1, 2, 2], coordinate_transformation_mode="tf_half_pixel_for_nn"), "tf_half_pixel_for_nn"),
    ],
)
def test_resize_refusals_name_the_node(kwargs, reason):
    with pytest.raises(ModelLoadError, match=rf"\(Resize\).*{reason}"):
        from_onnx(resize_model((5, 5), **kwargs))


def test_kept_aspect_ratio_by_a_fractional_scale_needs_a_half_pixel_mode():
    kept = dict(sizes=[7, 7], axes=[2, 3], keep_aspect_ratio_policy="not_larger", opset=18)  # one scale: 7 / 6
    x = np.random.default_rng(3).standard_normal((1, 2, 5, 6)).astype(np.float32)
    model = resize_model((5, 6), mode="cubic", **kept)
    np.testing.assert_allclose(interpret(from_onnx(model), {"x": x})["y"], run_ort(model, x), rtol=1e-5, atol=1e-6)
    with pytest.raises(ModelLoadError, match=r"\(Resize\).*align_corners: the scale 1.166.* is not whole"):
        from_onnx(resize_model((5, 6), coordinate_transformation_mode="align_corners", **kept))
