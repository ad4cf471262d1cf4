"""Everything a GPU machine should tell us, in one call (run by benchmarks/gpu_check.sh).

Steps, the most valuable figures first, as device time is scarce and a run may be cut short:
0. `imports`: every module the steps import, and the test files collected, with the box's
   python and the carried wheels; a failure stops the run at once with the missing module.
1. `bf16`: the in-process engine at 1 and 64 streams against the bandwidth limit (gpu_bench).
2. `fp8`: the same engine with FP8 weights, against FP8's limit.
3. `shards`: the engine over 2 expert shards on the one GPU (the data plane).
4. `sync_debug`: one eager bf16 decode forward under torch.cuda.set_sync_debug_mode("error"):
   a host sync anywhere in it raises.
5. `tests`: the CUDA test subset (decode graphs and FlexAttention, the experts' grouped GEMM,
   fidelity against transformers, FP8).
6. `attention_bench`: one layer's decode attention at a 2k context with an engine-sized cache.
7. `transformers`: transformers' generate on the same checkpoint, for the ratio.
One deadline for the whole run (--deadline, from this script's start): each step gets the
smaller of its own limit and what is left, and a step with too little left is skipped.
OUT/summary.json (status, seconds, figures) and the PNGs are written after every step.
With --device cpu every step runs small (benchmarks/gpu_rehearsal.sh runs it so, in a copy of
the box's python environment, before the GPU call).

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
    "tests/test_cuda_graph.py",
    "tests/test_flex_decode.py",
    "tests/test_experts.py",
    "tests/test_reference.py",
    "tests/test_fp8.py",
]
CPU_TESTS = ["tests/test_cuda_graph.py", "tests/test_experts.py"]
MIN_STEP_S = 20  # a step with less time left than this is skipped, not started

IMPORTS = """
import importlib, sys
mods = ["torch", "transformers", "safetensors", "numpy", "matplotlib", "pytest",
        "mistral_common.tokens.tokenizers.mistral",  # pydantic-extra-types -> pycountry
        "compressed_tensors", "moe.tokenizer", "moe.engine.llm_engine", "moe.expert_parallel.local_shards",
        "moe.checkpoint.tiny", "moe.layers.fp8"]
for m in mods:
    try:
        importlib.import_module(m)
    except Exception as e:  # any failure here stops the run, with its name
        print(f"gpu_check: the box's python cannot import {m}: {type(e).__name__}: {e}")
        print("gpu_check: add the missing package to benchmarks/gpu_wheels.sh, refill .whl/, and rehearse")
        sys.exit(2)
import torch
print(f"imports: ok (python {sys.version.split()[0]}, torch {torch.__version__})")
"""

SYNC_DEBUG = """
import sys, torch
from moe.engine.llm_engine import EngineConfig, LLMEngine
from moe.sampling import SamplingParams
from moe.checkpoint.tiny import make_tiny
cuda = torch.cuda.is_available()
d = make_tiny("/tmp/raymix-sync-check", hidden_size=256, intermediate_size=512)
eng = LLMEngine.from_pretrained(d, EngineConfig(dtype="bfloat16" if cuda else "float32", cuda_graphs=False,
                                                attention_backend="flex" if cuda else "sdpa",
                                                max_model_len=256, max_num_seqs=4))
for i in range(4):
    eng.add_request(str(i), [1, 5 + i, 9, 13], SamplingParams(max_tokens=4, temperature=0.0))
eng.step()  # prefill, eagerly (its host-side metadata is built before the forward)
forward = eng.model.forward
def checked(*args, **kwargs):
    if not cuda:  # the rehearsal: the same engine and step, without the sync check
        return forward(*args, **kwargs)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        return forward(*args, **kwargs)
    finally:
        torch.cuda.set_sync_debug_mode("default")
eng.model.forward = checked
eng.step()  # a decode forward under the sync check
print("eager bf16 decode forward: no host sync" if cuda else "eager decode forward ran (no sync check on CPU)")
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
    print(f"[{step}] {status} in {time.perf_counter() - start:.0f}s (limit {timeout:.0f}s)", flush=True)
    return {
        "status": status,
        "returncode": rc,
        "seconds": round(time.perf_counter() - start, 1),
        "limit_s": round(timeout),
        "tail": tail,
    }


def figures(result: dict[str, Any], name: str) -> dict[str, Any]:
    """A passed gpu_bench step's figures from its JSON (fractions of the limit first)."""
    path = RESULTS / f"{name}.json"
    if result["status"] == "pass" and path.is_file():
        data = json.loads(path.read_text())
        result["fraction_of_limit"] = data["fraction_of_limit"]
        result["tok_s"] = data["tok_s"]
        result["copy_bandwidth_GBps"] = round(data["copy_bandwidth_bytes_per_s"] / 1e9)
    return result


def main() -> None:
    started = time.monotonic()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--out", default="gpu-check-out")
    ap.add_argument("--layers", type=int, default=2, help="gpu_bench's Mixtral-8x7B-shaped layers")
    ap.add_argument(
        "--deadline", type=float, default=450, help="seconds for the whole run (the box's call: 480 s in all)"
    )
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    py, gpu = sys.executable, args.device == "cuda"
    summary: dict[str, Any] = {
        "device": args.device,
        "python": sys.version.split()[0],
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "deadline_s": args.deadline,
        "steps": {},
    }

    def record(step: str, result: dict[str, Any]) -> None:
        summary["steps"][step] = result
        summary["elapsed_s"] = round(time.monotonic() - started, 1)
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        for png in RESULTS.glob("*.png"):  # after every step: a cut-off run keeps its plots
            if png.stem.startswith(("gpu_bench", "attention_bench")):
                shutil.copy(png, out / png.name)

    def step(name: str, cmd: list[str], limit: float) -> dict[str, Any]:
        left = args.deadline - (time.monotonic() - started)
        if left < MIN_STEP_S:
            print(f"[{name}] skipped: {left:.0f}s left of the {args.deadline:.0f}s deadline", flush=True)
            return {"status": "skip", "reason": f"deadline: {left:.0f}s left"}
        return run(name, cmd, min(limit, left), out)

    result = step("imports", [py, "-c", IMPORTS], 60)
    if result["status"] == "pass":
        tests = CUDA_TESTS if gpu else CPU_TESTS
        collect = run(
            "collect",
            [py, "-m", "pytest", "-q", "--collect-only", "-p", "no:cacheprovider", *CUDA_TESTS],
            60,
            out,
        )
        result["tests_collected"] = collect["tail"][-1:] if collect["status"] == "pass" else collect["tail"]
        if collect["status"] != "pass":
            result["status"] = "fail"
    record("imports", result)
    if result["status"] != "pass":
        print("\n".join(result["tail"][-6:]))
        sys.exit(2)
    if gpu:
        import torch

        summary["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
        summary["torch"] = torch.__version__

    bench = [py, "benchmarks/gpu_bench.py", "--device", args.device, "--no-transformers", "--streams", "1"]
    if gpu:
        bench += ["64", "--layers", str(args.layers), "--tokens", "64", "--runs", "2"]
    else:
        bench += ["4", "--hidden-size", "256", "--intermediate-size", "512", "--layers", "2"]
        bench += ["--tokens", "8", "--runs", "1", "--dtype", "float32"]
    dev = args.device
    record("bf16", figures(step("bf16", [*bench, "--tag", "bf16"], 150), f"gpu_bench_{dev}_bf16"))
    fp8 = [*bench, "--no-engine", "--quantization", "fp8", "--tag", "fp8"]
    record("fp8", figures(step("fp8", fp8, 90), f"gpu_bench_{dev}_fp8"))
    shards = [*bench, "--no-engine", "--expert-shards", "2", "--tag", "shards"]
    record("shards", figures(step("shards", shards, 120), f"gpu_bench_{dev}_shards"))
    record("sync_debug", step("sync_debug", [py, "-c", SYNC_DEBUG], 60))
    tests = CUDA_TESTS if gpu else CPU_TESTS
    record("tests", step("tests", [py, "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider", *tests], 200))
    attention = [py, "benchmarks/attention_bench.py", "--device", dev, "--contexts", "2048"]
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
    result = step("attention_bench", attention, 60)
    attention_json = RESULTS / f"attention_bench_{dev}.json"
    if result["status"] == "pass" and attention_json.is_file():
        result["rows"] = json.loads(attention_json.read_text()).get("rows")
    record("attention_bench", result)
    hf = [b for b in bench if b != "--no-transformers"] + ["--no-engine", "--tag", "transformers"]
    record("transformers", figures(step("transformers", hf, 90), f"gpu_bench_{dev}_transformers"))
    summary["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    failed = [s for s, r in summary["steps"].items() if r["status"] in ("fail", "timeout")]
    skipped = [s for s, r in summary["steps"].items() if r["status"] == "skip"]
    record("done", {"status": "pass" if not failed else "fail", "failed": failed, "skipped": skipped})
    print(
        f"summary: {out / 'summary.json'}; {summary['elapsed_s']:.0f}s; failed: {failed or 'none'}; "
        f"skipped: {skipped or 'none'}"
    )
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
