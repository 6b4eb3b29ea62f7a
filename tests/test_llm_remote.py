"""LLM artifacts over TVM RPC (runtime/llm_remote.py) on host RPC servers (127.0.0.1), and the arm64 cross build.

The servers are tests/test_remote.py's: examples/edge/rpc_server_in_process.py with the runtime-only
TVM, as on the emulated device, so an x86 artifact runs there exactly as an arm64 one runs on the
device (tests/test_edge.py, marker ``edge``). The arm64 build is checked here without a device:
an aarch64 ELF that this host refuses to load and the x86 server refuses to take.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

import reshift.llm
from reshift import cli
from reshift.errors import ArtifactError, InputError, PassError
from reshift.runtime import remote
from reshift.runtime.llm_remote import RemoteLLM, connect_llm
from reshift.runtime.rpc_session import DeviceLost
from tests.llm_tiny import tiny_model
from tests.system_tools import require_tool
from tests.test_remote import Server

PROMPT = [3, 17, 42, 9, 100, 7]


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """Two host RPC servers (one for tests that kill theirs), started before the model compiles."""
    logs = tmp_path_factory.mktemp("llm-rpc-logs")
    started = [Server(logs / f"server{i}.log") for i in range(2)]
    try:
        yield started
    finally:
        for server in started:
            server.kill()


@pytest.fixture(scope="module")
def x86(servers, tmp_path_factory):
    """A tiny Llama compiled for this host: (artifact dir, the local LLM)."""
    llm = reshift.llm.compile(tiny_model("llama"), pipeline="exact", max_seq_len=64, max_batch=2)
    out = llm.save(tmp_path_factory.mktemp("llm-remote") / "llama_x86")
    for server in servers:
        server.wait_ready()
    return out, reshift.llm.load(out)


@pytest.fixture(scope="module")
def arm64(tmp_path_factory):
    """The same tiny Llama, BCQ 3-bit, cross-compiled for arm64 (the LUT GEMV's portable kernel)."""
    require_tool("aarch64-linux-gnu-gcc")
    build = reshift.llm.compile(tiny_model("llama"), pipeline="bcq", bits=3, target="arm64", max_seq_len=64)
    return build, build.save(tmp_path_factory.mktemp("llm-arm64") / "llama_arm64")


def test_remote_generation_matches_local(x86, servers):
    out, local = x86
    streamed: list[int] = []
    with connect_llm(out, rpc=servers[0].address, timeout=30) as llm:
        assert isinstance(llm, RemoteLLM) and llm.where == f"the device at {servers[0].address}"
        np.testing.assert_allclose(llm.prefill(np.array(PROMPT)), local.prefill(np.array(PROMPT)), rtol=0, atol=1e-6)
        greedy = llm.generate(np.array(PROMPT), max_new_tokens=24, stream=streamed.append)
        assert greedy.tolist() == local.generate(np.array(PROMPT), max_new_tokens=24).tolist()
        assert streamed == greedy.tolist()[len(PROMPT) :]
        # The device's caches were written in place by both entry points, as the local ones were.
        pos = len(PROMPT) + 23
        np.testing.assert_allclose(llm.cache_k.numpy()[:, :, :pos], local.cache_k.numpy()[:, :, :pos], atol=1e-6)
        kw = dict(max_new_tokens=16, do_sample=True, temperature=0.8, top_k=20, seed=7)
        assert llm.generate(np.array([PROMPT]), **kw).tolist() == local.generate(np.array([PROMPT]), **kw).tolist()
        with pytest.raises(InputError, match="2 sequences given: batch generation over RPC is not supported"):
            llm.generate([PROMPT, PROMPT[:3]], max_new_tokens=4)


def test_cli_generate_and_bench_remote(x86, servers, capsys):
    out, _ = x86
    argv = ["generate", str(out), "--prompt-ids", ",".join(map(str, PROMPT)), "-n", "12", "--json"]
    assert cli.main(argv) == 0
    here = capsys.readouterr().out
    assert cli.main([*argv, "--remote", servers[0].address]) == 0  # the session ends with the command
    assert capsys.readouterr().out == here
    assert cli.main(["bench", str(out), "--rpc", servers[0].address]) == 0
    printed = capsys.readouterr().out
    assert f"on the device at {servers[0].address}: prefill" in printed and "decode" in printed


def test_device_killed_mid_generation_raises_within_seconds(x86, servers):
    out, _ = x86
    server = servers[1]
    llm = connect_llm(out, rpc=server.address, timeout=30)
    start = time.monotonic()
    with pytest.raises(DeviceLost, match=f"lost the connection to the device at {server.address} while running decode"):
        llm.generate(np.array(PROMPT), max_new_tokens=32, stream=lambda token: server.kill())
    assert time.monotonic() - start < 15
    with pytest.raises(remote.DeviceError, match="no longer usable"):
        llm.decode(5)


def test_arm64_build_is_aarch64_and_runs_only_on_the_device(arm64, x86, servers):
    build, out = arm64
    assert remote.elf_arch(out / "model.so") == "aarch64"
    assert build.meta["target"]["name"] == "arm64" and build.meta["target"]["tvm_target"]["mtriple"].startswith(
        "aarch64"
    )
    assert {r["bits"] for r in build.report["layers"] if r["name"] != "lm_head"} == {3}
    refused = "built for target 'arm64' \\(aarch64\\) but this machine is x86_64; run it on an aarch64 device"
    with pytest.raises(ArtifactError, match=refused):
        reshift.llm.load(out)
    with pytest.raises(ArtifactError, match="--remote HOST:PORT"):
        build.generate(np.array(PROMPT))
    # The x86 server says what it is: the arm64 library is refused before it is uploaded.
    with pytest.raises(remote.DeviceError, match="architecture mismatch: .* \\(aarch64\\) but the device at .* x86_64"):
        connect_llm(out, rpc=servers[0].address, timeout=30)
    with connect_llm(x86[0], rpc=servers[0].address, timeout=30) as llm:  # and its session was ended
        assert llm.decode(5).shape == (256,)


def test_cli_compile_target_and_refusals(tmp_path, monkeypatch, capsys):
    model_dir = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(model_dir)
    with pytest.raises(PassError, match="unknown target 'riscv'.*arm64"):
        reshift.llm.compile(model_dir, target="riscv")
    from reshift.codegen.tvm import targets

    monkeypatch.setattr(targets.shutil, "which", lambda name: None)  # no cross compiler: refused before fitting
    with pytest.raises(PassError, match="cross compiler 'aarch64-linux-gnu-gcc', which is not on PATH"):
        reshift.llm.compile(model_dir, target="arm64")
    assert cli.main(["llm", "compile", str(model_dir), "-o", str(tmp_path / "o"), "--target", "arm64"]) == 2
    assert "apt-get install gcc-aarch64-linux-gnu" in capsys.readouterr().err
    assert not Path(tmp_path / "o" / "llm.json").exists()
