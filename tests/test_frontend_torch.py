"""frontend/torch.py: torch.export -> reshift IR, checked by the interpreter against torch eager."""

from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reshift import ir
from reshift.errors import UnsupportedOpError
from reshift.frontend import from_torch
from reshift.frontend.aten_ops import ATEN_CONVERTERS
from reshift.frontend.torch import decomposition_table


def relative_error(actual: np.ndarray, reference: np.ndarray) -> float:
    """max|actual - reference| / max|reference| in float64."""
    reference = np.asarray(reference, dtype=np.float64)
    scale = max(float(np.max(np.abs(reference))), 1e-30)
    return float(np.max(np.abs(np.asarray(actual, dtype=np.float64) - reference))) / scale


def check_against_eager(graph: ir.Graph, module: nn.Module, inputs: tuple, rtol: float = 1e-5) -> None:
    """Interpret ``graph`` on ``inputs`` and compare every output with ``module(*inputs)``."""
    feeds = {value.name: x.numpy() for value, x in zip(graph.inputs, inputs, strict=True)}
    outputs = list(ir.interpret(graph, feeds).values())
    with torch.no_grad():
        expected = module(*inputs)
    expected = expected if isinstance(expected, (tuple, list)) else (expected,)
    assert len(outputs) == len(expected)
    for actual, reference in zip(outputs, expected, strict=True):
        reference = reference.numpy()
        assert actual.shape == reference.shape and actual.dtype == reference.dtype
        if reference.dtype.kind in "biu":
            np.testing.assert_array_equal(actual, reference)
        else:
            assert relative_error(actual, reference) <= rtol


# -- small modules ----------------------------------------------------------------------------------
class ConvBnRelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        y = F.max_pool2d(torch.relu(self.bn(self.conv(x))), 2)
        return self.fc(y.mean((2, 3)))


def test_conv_bn_relu_linear_keeps_ops_whole_and_batch_dynamic():
    torch.manual_seed(0)
    module = ConvBnRelu().eval()
    graph = from_torch(module, (torch.randn(1, 3, 8, 8),))
    ir.verify(graph)
    assert graph.inputs[0].name == "x" and graph.inputs[0].type == ir.TensorType(("N", 3, 8, 8))
    assert graph.op_histogram() == {
        "conv2d": 1,
        "batch_norm": 1,
        "relu": 1,
        "max_pool2d": 1,
        "reduce_mean": 1,
        "linear": 1,
    }
    assert {"conv.weight", "bn.running_var", "fc.weight"} <= set(graph.constants)
    assert all(c.data.dtype == np.float32 for c in graph.constants.values())
    for batch in (1, 3):
        check_against_eager(graph, module, (torch.randn(batch, 3, 8, 8),))


class CausalAttention(nn.Module):
    """A GPT-style block: causal mask from triu (constant), batch flattened into rows."""

    def __init__(self, dim=16, heads=2, tokens=6):
        super().__init__()
        self.heads, self.tokens = heads, tokens
        self.ln = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.register_buffer("causal", torch.ones(tokens + 1, tokens + 1).triu(1).bool())

    def forward(self, x):
        b, t, c = x.shape
        x = torch.cat([self.cls.expand(b, -1, -1), x], dim=1)
        q, k, v = self.qkv(self.ln(x)).split(c, dim=-1)
        q, k, v = (z.reshape(b, t + 1, self.heads, -1).transpose(1, 2) for z in (q, k, v))
        scores = (q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5
        scores = scores.masked_fill(self.causal, float("-inf"))
        y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(-1, c)  # [(t+1)*N, c]
        y = F.gelu(self.proj(y)).reshape(b, t + 1, c)
        sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return y, sdpa


def test_attention_block_with_constant_mask_and_flattened_batch():
    torch.manual_seed(0)
    module = CausalAttention().eval()
    graph = from_torch(module, (torch.randn(2, 6, 16),))
    assert "triu" not in graph.op_histogram()  # folded to a constant by torch before conversion
    histogram = graph.op_histogram()
    assert histogram["linear"] == 2 and histogram["layer_norm"] == 1 and histogram["gelu"] == 1
    shapes = {str(v.type) for node in graph.nodes for v in node.outputs}
    assert "f32[7*N,16]" in shapes  # the batch flattened into rows stays symbolic
    cls_expand = [n for n in graph.nodes if n.op == "expand" and n.inputs[0].name == "cls"]
    assert cls_expand and cls_expand[0].output.type == ir.TensorType(("N", 1, 16))
    for batch in (1, 4):
        check_against_eager(graph, module, (torch.randn(batch, 6, 16),))


class MiscOps(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1d = nn.Conv1d(4, 6, 3, padding=1)
        self.ln = nn.LayerNorm(6)

    def forward(self, x, ids):
        h = F.pad(self.conv1d(x), (1, 2))  # [N, 6, 13]
        h = torch.roll(self.ln(h.transpose(1, 2)), 2, 1)
        a, b = h.split([2, 4], dim=-1)
        z = torch.cat([b, a], -1) * 2 - 1
        z = F.hardswish(z) + torch.clamp(z, min=-0.5, max=0.5) + F.leaky_relu(z, 0.1)
        w = z.reshape(-1, 6).softmax(-1).reshape(z.shape)
        img = ids.float()[:, None] / 3 + 1
        pooled = F.adaptive_avg_pool2d(img, 2) + F.avg_pool2d(img, 3, 1, 1)[:, :, :2, :2]
        return w, pooled.flatten(1), (ids > 2).sum(-1), torch.where(ids > 1, ids, -ids), ids[:, 1:3].amax(-1)


def test_misc_ops_and_integer_tensors():
    torch.manual_seed(0)
    module = MiscOps().eval()
    graph = from_torch(module, (torch.randn(2, 4, 10), torch.randint(0, 5, (2, 8, 8))))
    assert [str(v.type) for v in graph.inputs] == ["f32[N,4,10]", "i64[N,8,8]"]
    assert {"conv2d", "pad", "concat", "slice", "split", "avg_pool2d", "cast"} <= set(graph.op_histogram())
    for batch in (1, 3):
        check_against_eager(graph, module, (torch.randn(batch, 4, 10), torch.randint(0, 5, (batch, 8, 8))))


class BatchIndexedMask(nn.Module):
    """The Hugging Face mask idiom: ``mask[arange(B)[:, None, None, None], cols[None, None, None, :]]``."""

    def __init__(self, reverse: bool):
        super().__init__()
        self.reverse = reverse
        self.emb = nn.Embedding(10, 8)

    def forward(self, ids, mask):
        batch = torch.arange(ids.shape[0])[:, None, None, None]
        cols = torch.arange(ids.shape[1])
        cols = (cols.flip(0) if self.reverse else cols)[None, None, None, :]
        keep = mask.bool()[batch, cols]  # [N, 1, 1, T]
        rows = torch.arange(ids.shape[1])[None, None, :, None] >= 0
        bias = torch.where(rows & keep, 0.0, torch.finfo(torch.float32).min)
        h = self.emb(ids)
        return (h @ h.transpose(1, 2))[:, None] + bias


@pytest.mark.parametrize("reverse", [False, True])
def test_batch_arange_index_is_a_reshape_or_a_gather(reverse):
    torch.manual_seed(0)
    module = BatchIndexedMask(reverse).eval()
    ids, mask = torch.randint(0, 10, (2, 5)), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    graph = from_torch(module, (ids, mask))
    # arange indices are identities; reversed columns need a gather besides the embedding's
    assert graph.op_histogram()["gather"] == (2 if reverse else 1)
    for batch in (1, 3):
        ids, mask = torch.randint(0, 10, (batch, 5)), (torch.rand(batch, 5) > 0.3).long()
        check_against_eager(graph, module, (ids, mask))


class AdvancedIndexing(nn.Module):
    def forward(self, x):  # [N, 5, 6]
        rows = torch.arange(x.shape[0])[:, None]
        picked = x[:, torch.tensor([1, 3])][rows, torch.tensor([[1, 0, 1]])]  # identity + constant
        grid = x[:, :, torch.tensor([[0, 5], [1, 1]])]  # one constant index tensor, 2-D
        swapped = x.permute(1, 0, 2)[torch.tensor([0, 2])[:, None], torch.arange(x.shape[0])[None, :]]
        return picked, grid, swapped, x[:, 2], x[..., -1]


def test_advanced_indexing_by_constant_and_arange_tensors():
    module = AdvancedIndexing()
    graph = from_torch(module, (torch.randn(2, 5, 6),))
    for batch in (1, 3):
        check_against_eager(graph, module, (torch.randn(batch, 5, 6),))


ELEMENTARY = {
    "stack_unbind_chunk": lambda x: torch.stack([x.unbind(1)[2], x.chunk(2, -1)[1].sum(-1)], 1),
    "repeat": lambda x: x.repeat(1, 2, 1, 1),
    "var_std": lambda x: x.var(-1)[..., None] + x.std((2, 3), keepdim=True),
    "max_dim": lambda x: x.max(-1).values + F.adaptive_max_pool2d(x, 1)[..., 0],
    "upsample_nearest": lambda x: F.interpolate(x, scale_factor=2, mode="nearest"),
    "group_norm": nn.GroupNorm(2, 4),
    "elu_softplus_mish": lambda x: F.elu(x) + F.softplus(x) + F.mish(x),
    "flip": lambda x: x.flip(-1, 1),
    "einsum_baddbmm": lambda x: torch.einsum("nchw,nchv->nwv", x, x) + torch.baddbmm(x[:, 0], x[:, 1], x[:, 2]),
    "normalize_logsumexp": lambda x: F.normalize(x, dim=1) + x.logsumexp(-1, keepdim=True),
}


class Wrap(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


@pytest.mark.parametrize("name", sorted(ELEMENTARY))
def test_more_ops_match_eager(name):
    torch.manual_seed(0)
    module = Wrap(ELEMENTARY[name]).eval()
    graph = from_torch(module, (torch.randn(2, 4, 4, 4),))
    for batch in (1, 3):
        check_against_eager(graph, module, (torch.randn(batch, 4, 4, 4),))


# -- errors, fallbacks, plumbing -------------------------------------------------------------------
class Unconvertible(nn.Module):
    def forward(self, x):
        spectrum = torch.fft.rfft(x, dim=-1).abs().sum()
        inverse = torch.linalg.inv(torch.linalg.inv(x @ x.transpose(-1, -2) + torch.eye(4)))
        return spectrum + inverse.sum() + torch.sort(x, -1).values.sum()


def test_unsupported_ops_are_all_listed_with_counts():
    with pytest.raises(UnsupportedOpError) as info:
        from_torch(Unconvertible(), (torch.randn(2, 4, 4),))
    unsupported = info.value.unsupported
    assert set(unsupported) == {"aten._fft_r2c", "aten.linalg_inv_ex", "aten.sort"}
    assert len(unsupported["aten.linalg_inv_ex"]) == 2
    message = str(info.value)
    assert "torch model Unconvertible" in message and "aten.linalg_inv_ex x2" in message


def test_batch_pinned_by_the_model_falls_back_to_static_shapes():
    class Pinned(nn.Module):
        def forward(self, x):
            return x.reshape(2, -1).relu()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        graph = from_torch(Pinned(), (torch.randn(2, 3),))
    assert any("static shapes" in str(w.message) for w in caught)
    assert graph.inputs[0].type == ir.TensorType((2, 3))
    check_against_eager(graph, Pinned(), (torch.randn(2, 3),))


def test_static_export_and_input_names():
    module = ConvBnRelu().eval()
    graph = from_torch(module, torch.randn(2, 3, 8, 8), dynamic_batch=False, input_names=["image"])
    assert graph.inputs[0].name == "image" and graph.inputs[0].type == ir.TensorType((2, 3, 8, 8))
    check_against_eager(graph, module, (torch.randn(2, 3, 8, 8),))


def test_converters_are_kept_whole_by_the_decomposition_table():
    assert all(key.startswith("aten.") for key in ATEN_CONVERTERS)
    table = decomposition_table()
    aten = torch.ops.aten
    for op in (aten.linear.default, aten.matmul.default, aten.layer_norm.default, aten.gelu.default):
        assert op not in table
    assert aten.cumsum.default not in ATEN_CONVERTERS and "aten.addmm" in ATEN_CONVERTERS


def test_importing_the_frontend_package_does_not_import_torch():
    code = "import sys, reshift.frontend; assert 'torch' not in sys.modules and 'onnx' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# -- reference models ------------------------------------------------------------------------------
HEAVY = {"resnet18", "repvgg_a0_train", "repvgg_a0_deploy", "mobileone_s0", "vit_s16", "minilm", "minilm_builtin_mask"}


def model_names() -> list[str]:
    from examples.models import MODELS  # tests/conftest.py puts the repository root on sys.path

    return list(MODELS)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in HEAVY else n for n in model_names()])
def test_reference_model_matches_eager_at_batch_1_and_4(name):
    from examples.models import MODELS

    spec = MODELS[name]
    module = spec.build()
    graph = from_torch(module, spec.example_inputs(1), input_names=spec.input_names)
    ir.verify(graph)
    assert [v.name for v in graph.inputs] == list(spec.input_names)
    assert all(v.shape[0] == "N" for v in graph.inputs), "the batch dimension must stay symbolic"
    for batch in (1, 4):
        check_against_eager(graph, module, spec.example_inputs(batch), rtol=spec.rtol)


class _Float64Head(nn.Module):
    """A float64 layer between float32 casts: ``1 + 1e-9`` is lost in float32, kept in float64."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 3).double()

    def forward(self, x):
        y = self.linear(x.double()) * (1.0 + 1e-9) - self.linear(x.double())
        return y.float() * 1e9


def test_float64_is_computed_in_float64_not_narrowed():
    x = torch.randn(2, 4)
    model = _Float64Head()
    graph = from_torch(model, (x,))
    assert {v.type.dtype for v in graph.values()} == {"float32", "float64"}
    assert str(graph.constants["linear.weight"].dtype) == "float64"
    out = ir.interpret(graph, {graph.inputs[0].name: x.numpy()})
    (actual,) = out.values()
    np.testing.assert_allclose(actual, model(x).detach().numpy(), rtol=1e-6, atol=1e-6)
    assert np.abs(actual).max() > 1e-3  # in float32 the difference would be exactly 0
