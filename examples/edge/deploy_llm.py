"""An LLM on the (emulated) arm64 device: cross-build, run over TVM RPC, compare tokens with the host build.

    python examples/edge/deploy_llm.py --rpc 127.0.0.1:9090                      # tiny random Llama
    python examples/edge/deploy_llm.py --rpc 127.0.0.1:9090 --model MODEL_DIR --pipeline bcq --bits 3 -n 32
    python examples/edge/deploy_llm.py --tracker 127.0.0.1:9190 --key reshift-edge

The model is compiled twice from the same weights, for this host (``target="cpu"``) and for arm64;
the arm64 artifact runs on the device (``reshift.runtime.llm_remote``), the host one here. Greedy
tokens must be equal and the prompt's logits within 1e-4. Without ``--model`` the model is
tests/llm_tiny.py's random Llama (hidden 64, 2 layers; needs torch and transformers on the host).
Timings under emulation are qemu's, not a board's: only the ratios to each other mean anything.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]


def _model(path: str | None):
    if path:
        return path
    sys.path.insert(0, str(REPO))
    from tests.llm_tiny import tiny_model

    return tiny_model("llama")


def _timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def main() -> int:
    import reshift.llm
    from reshift.runtime import remote
    from reshift.runtime.llm_remote import RemoteLLM

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rpc", default=None, help="HOST:PORT of the device (default 127.0.0.1:9090)")
    parser.add_argument("--tracker", help="HOST:PORT of a tracker (then --key picks a device)")
    parser.add_argument("--key", default="reshift-edge")
    parser.add_argument("--model", help="local Hugging Face model directory (default: a tiny random Llama)")
    parser.add_argument("--pipeline", default="exact", choices=["exact", "bcq", "ternary"])
    parser.add_argument("--bits", type=float, default=3)
    parser.add_argument("--prompt-ids", default="3,17,42,9,100,7")
    parser.add_argument("-n", "--max-new-tokens", type=int, default=24)
    parser.add_argument("--max-seq-len", type=int, default=64)
    parser.add_argument("--timeout", type=float, default=120, help="seconds per remote call beyond its run time")
    parser.add_argument("--json", help="write the timings and tokens to this file")
    args = parser.parse_args()
    prompt = np.array([int(t) for t in args.prompt_ids.split(",")], np.int64)
    model = _model(args.model)
    bits = int(args.bits) if float(args.bits).is_integer() else args.bits
    kw = dict(pipeline=args.pipeline, bits=bits, max_seq_len=args.max_seq_len)

    with tempfile.TemporaryDirectory() as tmp:
        host, host_build_s = _timed(reshift.llm.compile, model, **kw)
        arm, arm_build_s = _timed(reshift.llm.compile, model, target="arm64", out_dir=Path(tmp) / "arm64", **kw)
        so = Path(tmp) / "arm64" / "model.so"
        session, connect_s = _timed(
            remote.connect, rpc=args.rpc or (None if args.tracker else "127.0.0.1:9090"), tracker=args.tracker,
            key=args.key if args.tracker else None, timeout=args.timeout,
        )  # fmt: skip
        with session:
            device, load_s = _timed(RemoteLLM, arm.path, session)
            logits, device_prefill_s = _timed(device.prefill, prompt)
            _, host_prefill_s = _timed(host.prefill, prompt)
            ids, device_gen_s = _timed(device.generate, prompt, max_new_tokens=args.max_new_tokens)
        expected, host_gen_s = _timed(host.generate, prompt, max_new_tokens=args.max_new_tokens)
        err = float(np.max(np.abs(logits - host.prefill(prompt))))
        same = ids.tolist() == expected.tolist()
        # generate = one prefill of the prompt, then max_new_tokens - 1 decode steps
        device_decode = (args.max_new_tokens - 1) / max(device_gen_s - device_prefill_s, 1e-9)
        host_decode = (args.max_new_tokens - 1) / max(host_gen_s - host_prefill_s, 1e-9)
        result = {
            "model": args.model or "tiny random Llama (tests/llm_tiny.py)",
            "pipeline": args.pipeline,
            "bits": bits if args.pipeline == "bcq" else None,
            "so_bytes": so.stat().st_size,
            "weights_bytes": (Path(tmp) / "arm64" / "weights.npz").stat().st_size,
            "host_build_s": host_build_s,
            "arm64_build_s": arm_build_s,
            "connect_s": connect_s,
            "upload_load_s": load_s,
            "device_prefill_s": device_prefill_s,
            "host_prefill_s": host_prefill_s,
            "device_decode_tokens_per_s": device_decode,
            "host_decode_tokens_per_s": host_decode,
            "max_logit_diff": err,
            "tokens_equal": same,
            "new_tokens": ids[len(prompt) :].tolist(),
        }
    print(f"arm64 model.so {result['so_bytes'] / 1e6:.2f} MB, weights {result['weights_bytes'] / 1e6:.2f} MB")
    print(f"build: host {host_build_s:.1f} s, arm64 {arm_build_s:.1f} s; connect {connect_s * 1e3:.0f} ms")
    print(f"upload + load (library, weights, caches) {load_s:.2f} s")
    print(f"prefill {len(prompt)} tokens: device {device_prefill_s * 1e3:.1f} ms, host {host_prefill_s * 1e3:.1f} ms")
    print(
        f"decode: device {device_decode:.1f} tokens/s, host {host_decode:.1f} tokens/s "
        f"(ratio {host_decode / device_decode:.1f}x; emulated by qemu, not a board's speed)"
    )
    print(f"max |device - host| prompt logits = {err:.2e}; {args.max_new_tokens} greedy tokens equal: {same}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0 if same and err <= 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
