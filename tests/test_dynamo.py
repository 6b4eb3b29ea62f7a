"""torch.compile(model, backend="reshift"): found through the entry point, matches eager, falls back cleanly.

One fresh subprocess runs every scenario (torch + TVM imports cost seconds) and reports JSON.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import json, sys, warnings
    import torch

    assert "reshift" not in sys.modules
    report = {}

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.bn = torch.nn.BatchNorm2d(8)
            self.fc = torch.nn.Linear(8, 4)

        def forward(self, x):
            return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))

    class Unsupported(torch.nn.Module):
        def forward(self, x):
            return torch.sort(x, dim=1).values * 2 + 1

    class Broken(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(4, 6)
            self.b = torch.nn.Linear(6, 3)

        def forward(self, x):
            h = torch.relu(self.a(x))
            torch._dynamo.graph_break()
            return torch.tanh(self.b(h)), h.sum(1)

    def fallback_messages(caught):
        return [str(w.message) for w in caught if w.category.__name__ == "ReshiftFallbackWarning"]

    torch.manual_seed(0)
    net = Net().eval()
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        compiled = torch.compile(net, backend="reshift", options={"pipeline": "exact", "target": "cpu"})
        errors = []
        for batch in (2, 5, 7, 2):
            x = torch.randn(batch, 3, 8, 8)
            y = compiled(x)
            errors.append(float((y - net(x)).abs().max()))
        report["net_errors"] = errors
        report["net_type"] = type(y).__name__
    report["net_fallbacks"] = fallback_messages(caught)
    report["reshift_built"] = "reshift.codegen.tvm" in sys.modules and "reshift.dynamo" in sys.modules

    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        model = Unsupported()
        compiled = torch.compile(model, backend="reshift")
        x = torch.randn(3, 5)
        report["unsupported_error"] = float((compiled(x) - model(x)).abs().max())
        x = torch.randn(3, 5)
        compiled(x)
    report["unsupported_fallbacks"] = fallback_messages(caught)

    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        model = Broken().eval()
        compiled = torch.compile(model, backend="reshift")
        x = torch.randn(2, 4)
        out, ref = compiled(x), model(x)
        report["break_errors"] = [float((a - b).abs().max()) for a, b in zip(out, ref)]
    report["break_fallbacks"] = fallback_messages(caught)
    print("REPORT" + json.dumps(report))
    """
)


@pytest.fixture(scope="module")
def report():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    line = next(line for line in out.stdout.splitlines() if line.startswith("REPORT"))
    return json.loads(line[len("REPORT") :])


def test_backend_found_without_importing_reshift_and_matches_eager(report):
    assert report["reshift_built"]
    assert report["net_type"] == "Tensor"
    assert max(report["net_errors"]) < 1e-4, report["net_errors"]
    assert report["net_fallbacks"] == [], report["net_fallbacks"]  # every batch size ran compiled code


def test_unsupported_op_falls_back_with_one_warning(report):
    assert report["unsupported_error"] == 0.0
    assert len(report["unsupported_fallbacks"]) == 1, report["unsupported_fallbacks"]
    assert "aten.sort" in report["unsupported_fallbacks"][0]


def test_graph_break_compiles_each_subgraph(report):
    assert max(report["break_errors"]) < 1e-5
    assert report["break_fallbacks"] == [], report["break_fallbacks"]
