"""Everything a GPU machine should tell us, in one call (run by benchmarks/gpu_check.sh).

Steps, each bounded in time, each recorded in OUT/summary.json as it ends (pass / fail / skip,
seconds, figures), so a run cut short still says what it found; the figures first, as device
time is scarce:
1. `sync_debug`: one eager bf16 decode forward under torch.cuda.set_sync_debug_mode("error"):
   a host sync anywhere in it raises.
2. `gpu_bench`: the in-process engine at 1/8/32/64 streams against the bandwidth limit, with
   FP8 weights, over 2 shards on the one GPU, and transformers (fractions of the limit).
3. `attention_bench`: one layer's decode attention at a 2k context with an engine-sized cache,
   the gather against FlexAttention.
4. `tests`: the CUDA test subset that matters: the readiness proofs, the decode path (graphs,
   FlexAttention), the experts' grouped GEMM, reference fidelity against transformers, FP8.
With --device cpu every step runs small (the script itself is tested that way).

    bash benchmarks/gpu_check.sh OUT                 # on the GPU machine
    bash benchmarks/gpu_check.sh --device cpu OUT    # here
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
CUDA_TESTS = [
    "tests/test_gpu_readiness.py",
    "tests/test_cuda_graph.py",
    "tests/test_flex_decode.py",
    "tests/test_experts.py",
    "tests/test_reference.py",
    "tests/test_fp8.py",
]
CPU_TESTS = ["tests/test_cuda_graph.py", "tests/test_gpu_readiness.py"]

SYNC_DEBUG = """
import torch
from moe.engine.llm_engine import EngineConfig, LLMEngine
from moe.sampling import SamplingParams
from moe.checkpoint.tiny import make_tiny
d = make_tiny("/tmp/raymix-sync-check", hidden_size=256, intermediate_size=512)
eng = LLMEngine.from_pretrained(d, EngineConfig(dtype="bfloat16", cuda_graphs=False, attention_backend="flex",
                                                max_model_len=256))
for i in range(4):
    eng.add_request(str(i), [1, 5 + i, 9, 13], SamplingParams(max_tokens=4, temperature=0.0))
eng.step()  # prefill, eagerly (its host-side metadata is built before the forward)
forward = eng.model.forward
def checked(*args, **kwargs):
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        return forward(*args, **kwargs)
    finally:
        torch.cuda.set_sync_debug_mode("default")
eng.model.forward = checked
eng.step()  # a decode forward under the sync check
print("eager bf16 decode forward: no host sync")
"""


def run(step: str, cmd: list[str], timeout: float, out: Path) -> dict[str, Any]:
    start = time.perf_counter()
    log = out / f"{step}.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        with log.open("w") as f:
            rc = subprocess.run(
                cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=timeout, env=env
            ).returncode
        status = "pass" if rc == 0 else "fail"
    except subprocess.TimeoutExpired:
        status, rc = "timeout", None
    tail = log.read_text(errors="replace").splitlines()[-15:]
    print(f"[{step}] {status} in {time.perf_counter() - start:.0f}s", flush=True)
    return {
        "status": status,
        "returncode": rc,
        "seconds": round(time.perf_counter() - start, 1),
        "tail": tail,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--out", default="gpu-check-out")
    ap.add_argument("--layers", type=int, default=2, help="gpu_bench's Mixtral-8x7B-shaped layers")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    py, gpu = sys.executable, args.device == "cuda"
    summary: dict[str, Any] = {
        "device": args.device,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "steps": {},
    }
    if gpu:
        import torch

        summary["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
        summary["torch"] = torch.__version__

    def record(step: str, result: dict[str, Any]) -> None:
        summary["steps"][step] = result
        (out / "summary.json").write_text(json.dumps(summary, indent=2))

    if gpu:
        record("sync_debug", run("sync_debug", [py, "-c", SYNC_DEBUG], 90, out))
    else:
        record("sync_debug", {"status": "skip", "reason": "torch.cuda.set_sync_debug_mode needs a GPU"})
    bench = [
        py,
        "benchmarks/gpu_bench.py",
        "--device",
        args.device,
        "--quantization",
        "fp8",
        "--expert-shards",
        "2",
    ]
    if gpu:
        bench += [
            "--layers",
            str(args.layers),
            "--streams",
            "1",
            "8",
            "32",
            "64",
            "--tokens",
            "64",
            "--runs",
            "2",
        ]
    else:
        bench += [
            "--hidden-size",
            "256",
            "--intermediate-size",
            "512",
            "--layers",
            "2",
            "--streams",
            "1",
            "4",
        ]
        bench += ["--tokens", "8", "--runs", "1", "--no-transformers", "--dtype", "float32"]
    result = run("gpu_bench", bench, 270 if gpu else 600, out)
    bench_json = RESULTS / f"gpu_bench_{args.device}.json"
    if result["status"] == "pass" and bench_json.is_file():
        data = json.loads(bench_json.read_text())
        result["fraction_of_limit"] = data["fraction_of_limit"]
        result["tok_s"] = data["tok_s"]
        result["copy_bandwidth_GBps"] = round(data["copy_bandwidth_bytes_per_s"] / 1e9)
    record("gpu_bench", result)
    attention = [py, "benchmarks/attention_bench.py", "--device", args.device, "--contexts", "2048"]
    attention += (
        ["--streams", "1", "8", "64", "--cache-blocks", "20000"]
        if gpu
        else [
            "--streams",
            "1",
            "4",
            "--dtype",
            "float32",
            "--iters",
            "3",
            "--runs",
            "1",
            "--cache-blocks",
            "600",
        ]
    )
    result = run("attention_bench", attention, 90 if gpu else 600, out)
    attention_json = RESULTS / f"attention_bench_{args.device}.json"
    if result["status"] == "pass" and attention_json.is_file():
        result["rows"] = json.loads(attention_json.read_text()).get("rows")
    record("attention_bench", result)
    tests = CUDA_TESTS if gpu else CPU_TESTS
    record(
        "tests",
        run(
            "tests",
            [py, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
            360 if gpu else 600,
            out,
        ),
    )
    for png in RESULTS.glob("*.png"):
        if png.stem.startswith(("gpu_bench", "attention_bench")):
            shutil.copy(png, out / png.name)
    summary["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    record("done", {"status": "pass"})
    failed = [s for s, r in summary["steps"].items() if r["status"] in ("fail", "timeout")]
    print(f"summary: {out / 'summary.json'}; failed steps: {failed or 'none'}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
