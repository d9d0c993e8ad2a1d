"""EleutherAI's lm-evaluation-harness against the served app, as users run it on a Kimi server:
`local-completions` (generation, with and without token-id prompts, and multiple choice scored by
loglikelihood) and `local-chat-completions`. Every request must get a 200, and the loglikelihoods
lm-eval scores choices with must equal transformers' own.

The tasks are small local JSONL files written here (no hub, no network)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lm_eval
import pytest
import torch
import yaml
from lm_eval.api.registry import get_model
from lm_eval.tasks import TaskManager

from runtime.checkpoint.maker import make_checkpoint
from tests.e2e.serve_app import ServeApp, deploy_config, free_port
from tests.reference import reference_model

MAX_GEN_TOKS = 8
QUESTIONS = [(1, 2), (3, 4), (5, 6), (7, 8), (9, 10)]
SUBJECTS = ["sky", "grass", "apple", "sea"]
COLOURS = ["red", "green", "blue"]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    # Its own cluster, as test_http's: a module fixture is per module anyway, so importing that one
    # would start a second cluster all the same. Served by its path, as vLLM names a model.
    model_dir = make_checkpoint(tmp_path_factory.mktemp("lm-eval-cache") / "tiny", "tiny", seed=0)
    port = free_port()
    served = ServeApp(port)
    try:
        served.deploy(deploy_config({"model": str(model_dir)}, port=port))
        yield served, model_dir
    finally:
        served.close()


def _task(folder: Path, name: str, rows: list[dict[str, Any]], **spec: Any) -> None:
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {"task": name, "dataset_path": "json", "test_split": "test",
              "dataset_kwargs": {"data_files": {"test": str(data)}, "cache_dir": str(folder / "hf-cache")}, **spec}
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> TaskManager:
    folder = tmp_path_factory.mktemp("lm-eval-tasks")
    generate = {"output_type": "generate_until", "doc_to_text": "{{question}}", "doc_to_target": "{{answer}}",
                "metric_list": [{"metric": "exact_match"}]}
    greedy = {"until": ["\n\n"], "max_gen_toks": MAX_GEN_TOKS, "do_sample": False, "temperature": 0}
    sums = [{"question": f"Q: what is {a} plus {b}?\nA:", "answer": str(a + b)} for a, b in QUESTIONS]
    _task(folder, "clients_gen", sums, **generate, generation_kwargs=greedy)
    # Kimi's template opens a thinking block by default; without it the answer lands in `content`,
    # which is what lm-eval reads. Extra generation kwargs travel in the body as they are.
    _task(folder, "clients_chat", sums, **generate,
          generation_kwargs={**greedy, "chat_template_kwargs": {"thinking": False}})
    colours = [{"question": f"The colour of the {s} is", "choices": COLOURS, "label": i % len(COLOURS)}
               for i, s in enumerate(SUBJECTS)]
    _task(folder, "clients_mc", colours, output_type="multiple_choice", doc_to_text="{{question}}",
          doc_to_choice="choices", doc_to_target="label", metric_list=[{"metric": "acc"}])
    return TaskManager(include_path=str(folder))


def evaluate(served: ServeApp, kind: str, model_args: str, task_manager: TaskManager, task: str,
             requests: int, apply_chat_template: bool = False) -> tuple[Any, list[dict[str, Any]]]:
    """One lm-eval run (the model built from its argument string, as the CLI does); asserts that
    every request it sent got a 200. Returns the model and its per-document samples."""
    args = f"{model_args},num_concurrent=1,max_retries=1,timeout=60"
    lm = get_model(kind).create_from_arg_string(args)
    before = served.stats()["router"]["responses"]
    out = lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=task_manager, log_samples=True,
                                  apply_chat_template=apply_chat_template)
    after = served.stats()["router"]["responses"]
    sent = {code: n - before.get(code, 0) for code, n in after.items() if n != before.get(code, 0)}
    assert sent == {"200": requests}, sent
    assert out is not None and out["results"][task]["sample_len"] == len(out["samples"][task])
    return lm, out["samples"][task]


def completions_args(served: ServeApp, model_dir: Path, tokenized: bool) -> str:
    return (f"model={model_dir},base_url={served.base_url}/v1/completions,tokenizer={model_dir},"
            f"tokenized_requests={tokenized}")


@pytest.mark.parametrize("tokenized", [True, False], ids=["token-ids", "text"])
def test_generate_until_through_completions(app, tasks, tokenized) -> None:
    served, model_dir = app
    _, samples = evaluate(served, "local-completions", completions_args(served, model_dir, tokenized), tasks,
                          "clients_gen", requests=len(QUESTIONS))
    answers = [s["resps"][0][0] for s in samples]
    assert len(answers) == len(QUESTIONS) and all(isinstance(a, str) and a for a in answers)


def test_multiple_choice_loglikelihoods_equal_transformers(app, tasks) -> None:
    served, model_dir = app
    lm, samples = evaluate(served, "local-completions", completions_args(served, model_dir, True), tasks,
                           "clients_mc", requests=len(SUBJECTS) * len(COLOURS))
    ref = reference_model(str(model_dir))
    deviations = []
    for sample in samples:
        for (context, continuation), (loglikelihood, greedy) in zip(sample["arguments"], sample["filtered_resps"],
                                                                   strict=True):
            context_ids, continuation_ids = lm._encode_pair(context, continuation)  # the tokens lm-eval sent
            expected, expected_greedy = reference_loglikelihood(ref, context_ids, continuation_ids)
            deviations.append(abs(loglikelihood - expected))
            assert greedy == expected_greedy, (context, continuation)
    assert len(deviations) == len(SUBJECTS) * len(COLOURS) and max(deviations) < 1e-3, max(deviations)


def reference_loglikelihood(ref: Any, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """transformers' summed log-probability of the continuation after the context, and whether
    each of its tokens is the argmax (lm-eval's is_greedy)."""
    ids = context + continuation
    with torch.no_grad():
        logprobs = torch.log_softmax(ref(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)  # [S, vocab]
    rows = logprobs[len(context) - 1:len(ids) - 1]  # row i predicts ids[i + 1]
    targets = torch.tensor(continuation)
    total = float(rows.gather(1, targets[:, None]).sum())
    return total, bool((rows.argmax(dim=-1) == targets).all())


def test_generate_through_chat_completions(app, tasks) -> None:
    served, model_dir = app
    _, samples = evaluate(served, "local-chat-completions",
                          f"model={model_dir},base_url={served.base_url}/v1/chat/completions", tasks,
                          "clients_chat", requests=len(QUESTIONS), apply_chat_template=True)
    answers = [s["resps"][0][0] for s in samples]
    assert len(answers) == len(QUESTIONS) and all(isinstance(a, str) and a for a in answers)
