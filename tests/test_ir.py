"""The IR: types, builder, verifier, text form (round trip, incl. a hypothesis property), views."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reshift import ir
from reshift.errors import InputError, IRTypeError, ParseError, UnknownOpError, VerificationError
from reshift.ir.specialize import specialize, specialize_batch
from reshift.ir.types import TensorType, dim_div, dim_mul, dims_product, make_dim, resolve_dim, split_dim

TINY = """
graph tiny(%x: f32[N,4]) {
  const %w: f32[2,4] = [0.5, -1.0, 2.0, 0.0, 1.0, 1.0, -0.25, 3.0]
  const %b: f32[2] = [0.1, -0.2]
  %y: f32[N,2] = linear(%x, %w, %b) @fc
  %z: f32[N,2] = relu(%y) @act
  return %z
}
"""


def test_tensor_type_text_and_symbols():
    t = TensorType.parse("f32[N,3,224,224]")
    assert t.shape == ("N", 3, 224, 224) and t.dtype == "float32"
    assert str(t) == "f32[N,3,224,224]" and t.symbols == {"N"} and not t.is_static
    assert TensorType.parse("i64[]").shape == ()
    assert dim_mul("N", 197) == "197*N" and dim_div("197*N", 197) == "N" and dim_div("6*N", "N") == 6


@pytest.mark.parametrize("bad", ["f33[1]", "f32(1,2)", "f32[1,-2]", "f32[2*3*N]"])
def test_tensor_type_rejects_malformed(bad):
    with pytest.raises(IRTypeError):
        TensorType.parse(bad)


def test_dim_div_refuses_fractions():
    with pytest.raises(IRTypeError):
        dim_div("N", 2)


def test_parse_interpret_tiny():
    g = ir.parse(TINY)
    ir.verify(g)
    out = ir.interpret(g, {"x": np.array([[1, 2, 3, 4], [0, 0, 0, 0]], dtype=np.float32)})["z"]
    np.testing.assert_allclose(out, [[4.6, 14.05], [0.1, 0.0]], rtol=1e-6)


def test_print_parse_round_trip_with_weights(rng):
    b = ir.GraphBuilder("rt")
    x = b.input("x", "f32[N,3,8,8]")
    w = b.constant(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    y = b.conv2d(x, w, None, padding=(1, 1, 1, 1), groups=1)
    parts = b.split(b.reshape(b.relu(y), shape=("N", -1)), axis=1, sizes=[100, 156])
    g = b.build(parts[0], b.gelu(parts[1], approximate="tanh"))
    text = ir.print_graph(g)
    assert ir.print_graph(ir.parse(text)) == text
    assert "..." in str(g)  # the readable form elides big weights
    with pytest.raises(ParseError, match="elided"):
        ir.parse(str(g))
    again = ir.parse(str(g), weights={"w": w.data})
    xs = {"x": rng.standard_normal((2, 3, 8, 8)).astype(np.float32)}
    for a, c in zip(ir.interpret(g, xs).values(), ir.interpret(again, xs).values(), strict=True):
        np.testing.assert_array_equal(a, c)


UNARY = ["relu", "sigmoid", "tanh", "neg", "abs", "identity", "gelu", "exp"]
BINARY = ["add", "sub", "mul", "maximum"]


@st.composite
def random_graphs(draw):
    """Random chains and joins of elementwise, linear and layout ops over a symbolic batch."""
    width = draw(st.integers(1, 5))
    b = ir.GraphBuilder(draw(st.sampled_from(["g", "net", "main"])))
    values = [b.input("x", f"f32[N,{width}]")]
    for _ in range(draw(st.integers(1, 12))):
        kind = draw(st.sampled_from(["unary", "binary", "linear", "const", "softmax"]))
        x = draw(st.sampled_from(values))
        if kind == "unary":
            values.append(b.op(draw(st.sampled_from(UNARY)), x))
        elif kind == "binary":
            values.append(b.op(draw(st.sampled_from(BINARY)), x, draw(st.sampled_from(values))))
        elif kind == "linear":
            data = draw(st.lists(st.floats(-4, 4, width=32), min_size=width * width, max_size=width * width))
            w = b.constant(np.array(data, dtype=np.float32).reshape(width, width))
            values.append(b.linear(x, w, None))
        elif kind == "const":
            data = draw(st.lists(st.floats(-1e6, 1e6, width=32, allow_subnormal=True), min_size=width, max_size=width))
            values.append(b.add(x, b.constant(np.array(data, dtype=np.float32))))
        else:
            values.append(b.softmax(x, axis=-1))
    return b.build(*draw(st.lists(st.sampled_from(values[1:]), min_size=1, max_size=2, unique_by=id)))


@settings(max_examples=60, deadline=None)
@given(random_graphs())
def test_text_round_trip_property(graph):
    text = ir.print_graph(graph)
    parsed = ir.parse(text)
    ir.verify(parsed)
    assert ir.print_graph(parsed) == text


def test_verify_reports_broken_invariants(rng):
    g = ir.parse(TINY)
    g.nodes.reverse()  # relu now reads %y before it is defined
    with pytest.raises(VerificationError, match="not defined before use"):
        ir.verify(g)
    g = ir.parse(TINY)
    g.nodes[1].outputs[0].type = TensorType(("N", 3), "float32")
    with pytest.raises(VerificationError, match="recorded types"):
        ir.verify(g)
    g = ir.parse(TINY)
    g.nodes[1].outputs[0].name = "y"
    with pytest.raises(VerificationError, match="defined twice"):
        ir.verify(g)
    g = ir.parse(TINY)
    g.nodes[0].attrs["bogus"] = 1
    with pytest.raises(VerificationError, match="unknown attribute"):
        ir.verify(g)


TWO_SYMBOLS = """
graph g(%x: f32[N,S,8], %m: f32[N,S]) {
  %flat: f32[N*S,8] = reshape(%x) {shape=[N*S, 8]} @flat
  %heads: f32[N,S,2,4] = reshape(%flat) {shape=[N, S, 2, 4]} @heads
  %t: f32[N,2,S,4] = transpose(%heads) {perm=[0, 2, 1, 3]} @t
  %p: f32[N,S,8] = reshape(%t) {shape=[N, S, 8]} @p
  %mm: f32[N,S,1] = reshape(%m) {shape=[N, S, 1]} @mm
  %y: f32[N,S,8] = mul(%p, %mm) @y
  return %y
}
"""


def test_two_symbols_through_text_verify_and_interpret():
    g = ir.parse(TWO_SYMBOLS)
    ir.verify(g)
    assert ir.parse(str(g)).nodes[0].outputs[0].type == TensorType(("S*N", 8))  # canonical: N*S
    rng = np.random.default_rng(0)
    for n, s in ((1, 3), (2, 5)):
        x, m = rng.standard_normal((n, s, 8)).astype(np.float32), rng.standard_normal((n, s)).astype(np.float32)
        want = x.reshape(n, s, 2, 4).transpose(0, 2, 1, 3).reshape(n, s, 8) * m[..., None]
        np.testing.assert_allclose(ir.interpret(g, {"x": x, "m": m})["y"], want, rtol=1e-6)
    with pytest.raises(InputError, match=r"input 'm'.*axis 1 is 4, inconsistent with S=5 from input 'x' axis 1"):
        ir.interpret(g, {"x": np.zeros((2, 5, 8), np.float32), "m": np.zeros((2, 4), np.float32)})


def test_dim_algebra_over_monomials():
    assert dim_mul("S", "4*N") == "4*N*S" and dim_mul("N*S", "N") == "N*N*S"
    assert dim_div("12*N*S", "4*S") == "3*N" and dim_div("N*S", "N*S") == 1 and dim_div("384*N*S", 384) == "N*S"
    assert resolve_dim("12*N*S", {"N": 2, "S": 3}) == 72 and dims_product(["N", "S", 6]) == "6*N*S"
    assert make_dim(*split_dim("6*S*N")) == "6*N*S" and split_dim("6*S*N") == (6, "N*S")
    for bad in (("N*S", "T"), ("N*S", "N*N"), ("3*N", 2)):
        with pytest.raises(IRTypeError):
            dim_div(*bad)
    with pytest.raises(IRTypeError, match="has no value"):
        resolve_dim("N*S", {"N": 2})


@pytest.mark.parametrize("bad", ["N+1", "2*3*N", "N**2", "0*N", "N*", "*N"])
def test_malformed_dims_are_refused(bad):
    with pytest.raises(IRTypeError, match="malformed"):
        TensorType(("N", bad))


def test_specialize_binds_some_symbols():
    g = specialize(ir.parse(TWO_SYMBOLS), {"S": 3})
    assert g.inputs[0].type == TensorType(("N", 3, 8)) and g.nodes[0].attrs["shape"] == ("3*N", 8)
    x, m = np.ones((2, 3, 8), np.float32), np.ones((2, 3), np.float32)
    assert ir.interpret(g, {"x": x, "m": m})["y"].shape == (2, 3, 8)
    assert specialize_batch(ir.parse(TWO_SYMBOLS), 2).inputs[1].type == TensorType((2, "S"))


def test_builder_type_errors_name_the_node():
    b = ir.GraphBuilder()
    x = b.input("x", "f32[1,4]")
    w = b.constant(np.zeros((3, 5), np.float32))
    with pytest.raises(IRTypeError, match="linear"):
        b.linear(x, w, None, name="fc1")
    with pytest.raises(UnknownOpError, match="frobnicate"):
        b.op("frobnicate", x)
    with pytest.raises(IRTypeError, match="unknown attribute"):
        b.relu(x, alpha=1.0)


def test_parse_errors_name_the_line():
    with pytest.raises(ParseError, match="line 3"):
        ir.parse("graph g(%x: f32[1]) {\n %y: f32[1] = relu(%x) @r\n %z: f32[1] = relu(%nope) @s\n return %z\n}")
    with pytest.raises(ParseError):
        ir.parse("not a graph")


def test_interpreter_checks_inputs():
    g = ir.parse(TINY)
    with pytest.raises(InputError, match="missing"):
        ir.interpret(g, {})
    with pytest.raises(InputError, match="unexpected"):
        ir.interpret(g, {"x": np.zeros((1, 4), np.float32), "y": np.zeros(1)})
    with pytest.raises(InputError, match="dtype"):
        ir.interpret(g, {"x": np.zeros((1, 4), np.float64)})
    with pytest.raises(InputError, match="shape"):
        ir.interpret(g, {"x": np.zeros((1, 5), np.float32)})


def test_symbolic_batch_binds_consistently():
    g = ir.parse("graph g(%a: f32[N,2], %b: f32[N,2]) {\n %c: f32[N,2] = add(%a, %b) @s\n return %c\n}")
    assert ir.interpret(g, {"a": np.ones((3, 2), np.float32), "b": np.ones((3, 2), np.float32)})["c"].shape == (3, 2)
    with pytest.raises(InputError, match="inconsistent"):
        ir.interpret(g, {"a": np.ones((3, 2), np.float32), "b": np.ones((2, 2), np.float32)})


def test_reshape_with_flattened_batch():
    g = ir.parse(
        "graph g(%x: f32[N,5,4]) {\n"
        " %f: f32[5*N,4] = reshape(%x) {shape=[-1, 4]} @flat\n"
        " %u: f32[N,5,4] = reshape(%f) {shape=[N, 5, 4]} @unflat\n"
        " return %f, %u\n}"
    )
    ir.verify(g)
    x = np.arange(60, dtype=np.float32).reshape(3, 5, 4)
    out = ir.interpret(g, {"x": x})
    assert out["f"].shape == (15, 4)
    np.testing.assert_array_equal(out["u"], x)


def test_networkx_view_is_derived():
    g = ir.parse(TINY)
    view = g.to_networkx()
    assert view.nodes["fc"]["op"] == "linear"
    assert view.has_edge("input:x", "fc") and view.has_edge("const:w", "fc") and view.has_edge("fc", "act")
    view.remove_node("fc")
    assert [n.name for n in g.nodes] == ["fc", "act"]


def test_summary_counts(rng):
    g = ir.parse(TINY)
    assert "linear x1" in g.summary() and "40 parameter bytes" in g.summary()


def test_base64_weights_containing_comment_marker_round_trip():
    # 0xFFFBFF7F little-endian encodes as "//v/f..." in base64: the comment syntax must not cut it
    weight = np.full(32, np.frombuffer(b"\xff\xfb\xff\x7f", "<f4")[0])
    b = ir.GraphBuilder("g")
    x = b.input("x", "f32[32]")
    g = b.build(b.add(x, b.constant(weight)))
    text = ir.print_graph(g)
    assert "//" in text
    assert ir.print_graph(ir.parse(text)) == text
    assert ir.parse("graph g(%x: f32[1]) {  // a comment\n return %x // another\n}").outputs[0].name == "x"
