"""Third-party clients raymix's authors did not write, against a live raymix HTTP server (the
API in this process on 127.0.0.1 over the real engine; no Ray needed for what is tested here):
lm-eval's `local-completions` scores a multiple-choice task exactly as its `hf` backend does
on the same checkpoint, and instructor / the openai SDK's pydantic tools get forced tool calls
with `$defs` schemas back as valid objects."""

from __future__ import annotations

import enum
import json

import pytest
from pydantic import BaseModel, Field

from tests.local_server import local_server

QUESTIONS = [
    ("The capital of France is", ["Paris", "Berlin", "Madrid"], 0),
    ("Two plus two equals", ["three", "four", "five", "twenty-two"], 1),
    ("The sky on a clear day is", ["green", "blue"], 1),
    ("Water freezes at zero degrees", ["Celsius", "Fahrenheit", "Kelvin"], 0),
    ("The opposite of hot is", ["cold", "warm", "tepid"], 0),
    ("A week has", ["five days", "seven days", "ten days"], 1),
    ("Mixtral routes each token to", ["two experts", "all experts", "no expert"], 0),
    ("\nThe first letter of the alphabet is", ["A", "Z", "M"], 0),
]


@pytest.fixture(scope="module")
def base_url(tiny_dir):
    """raymix's API served by uvicorn on 127.0.0.1, as `raymix serve` serves it (one process)."""
    with local_server(tiny_dir, served_model_name=["tiny"]) as url:
        yield f"{url}/v1"


# ---- lm-eval: log-likelihoods over /v1/completions (echo + logprobs) ----


def _mc_task(tmp_path) -> str:
    """A local multiple-choice task (jsonl + task yaml; no dataset download)."""
    data = tmp_path / "mc.jsonl"
    data.write_text("\n".join(json.dumps({"q": q, "choices": c, "answer": a}) for q, c, a in QUESTIONS))
    (tmp_path / "raymix_mc.yaml").write_text(
        "task: raymix_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: '{{q}}'\n"
        "doc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\n"
        "metric_list:\n  - metric: acc\n"
    )
    return str(tmp_path)


def _evaluate(model: str, model_args: dict, include_path: str) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    return simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=["raymix_mc"],
        task_manager=TaskManager(include_path=include_path),
        log_samples=True,
        random_seed=0,
        numpy_random_seed=0,
        torch_random_seed=0,
        fewshot_random_seed=0,
    )


def test_lm_eval_local_completions_scores_as_its_hf_backend(base_url, tiny_dir, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tasks = _mc_task(tmp_path)
    served = _evaluate(
        "local-completions",
        {
            "model": "tiny",
            "base_url": f"{base_url}/completions",
            "tokenizer": str(tiny_dir),
            "tokenizer_backend": "huggingface",
            "add_bos_token": True,
            "num_concurrent": 2,
            "max_retries": 1,
        },
        tasks,
    )
    local = _evaluate(
        "hf", {"pretrained": str(tiny_dir), "dtype": "float32", "device": "cpu", "add_bos_token": True}, tasks
    )

    def by_doc(results: dict) -> dict[int, list[tuple[float, bool]]]:
        return {s["doc_id"]: [tuple(r) for r in s["filtered_resps"]] for s in results["samples"]["raymix_mc"]}

    ours, theirs = by_doc(served), by_doc(local)
    assert sorted(ours) == sorted(theirs) == list(range(len(QUESTIONS)))
    n_choices = 0
    for doc in ours:
        assert len(ours[doc]) == len(theirs[doc]) == len(QUESTIONS[doc][1])
        for (ll, greedy), (ll_ref, greedy_ref) in zip(ours[doc], theirs[doc], strict=True):
            assert ll == pytest.approx(ll_ref, abs=1e-4) and ll < 0  # not the 0 of a missing echo
            assert greedy == greedy_ref
            n_choices += 1
    assert n_choices == sum(len(c) for _, c, _ in QUESTIONS)
    print("\n| question | choice | local-completions (raymix) | hf | greedy |")
    print("|---|---|---:|---:|---|")
    for doc in sorted(ours):
        for c, ((ll, greedy), (ll_ref, _)) in enumerate(zip(ours[doc], theirs[doc], strict=True)):
            print(
                f"| {QUESTIONS[doc][0].strip()} | {QUESTIONS[doc][1][c]} | {ll:.5f} | {ll_ref:.5f} | {greedy} |"
            )
    acc = served["results"]["raymix_mc"]["acc,none"]
    assert acc == local["results"]["raymix_mc"]["acc,none"]
    print(f"\nlm-eval raymix_mc: {n_choices} choices, acc {acc:.3f} (local-completions = hf)")


# ---- instructor and the openai SDK: pydantic models as forced tools ----


class Color(enum.Enum):
    RED = "red"
    GREEN = "green"


class Address(BaseModel):
    city: str = Field(max_length=12)
    zip: str | None = Field(default=None, max_length=5)


class Order(BaseModel):
    """An Enum, a nested model, an Optional model and a list of models: `$defs` and `$ref`."""

    color: Color
    ship_to: Address
    bill_to: Address | None = None
    items: list[Address] = Field(max_length=2)


def test_instructor_tools_mode_gets_a_valid_model(base_url):
    instructor = pytest.importorskip("instructor")
    import openai

    client = instructor.from_openai(openai.OpenAI(base_url=base_url, api_key="x"), mode=instructor.Mode.TOOLS)
    for seed in range(3):
        order = client.chat.completions.create(
            model="tiny",
            response_model=Order,
            messages=[{"role": "user", "content": "Order a red thing to Paris."}],
            max_tokens=400,
            temperature=1.0,
            seed=seed,
            max_retries=0,
        )
        assert isinstance(order, Order) and isinstance(order.color, Color)


@pytest.mark.parametrize("tool_choice", ["required", "named"])
def test_openai_pydantic_function_tool_is_parsed(base_url, tool_choice):
    import openai

    client = openai.OpenAI(base_url=base_url, api_key="x")
    choice = {"type": "function", "function": {"name": "Order"}} if tool_choice == "named" else "required"
    out = client.chat.completions.parse(
        model="tiny",
        messages=[{"role": "user", "content": "Order something."}],
        tools=[openai.pydantic_function_tool(Order)],
        tool_choice=choice,  # type: ignore[arg-type]
        max_tokens=400,
        temperature=0,
    )
    msg = out.choices[0].message
    assert out.choices[0].finish_reason == "tool_calls" and msg.content in (None, "")
    assert msg.tool_calls and all(isinstance(c.function.parsed_arguments, Order) for c in msg.tool_calls)
