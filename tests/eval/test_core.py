"""CORE (spec §9.1): prompts, spans and scores of every task type against hand computations, batched ==
unbatched, the bundle reader's errors, the cached download, and the offline CORE-subset bundle."""

from __future__ import annotations

import json
import math
import random
import shutil
import zipfile

import pytest
import torch
from eval_testdata import (
    LM_ITEMS,
    MC_ITEMS,
    SCHEMA_ITEMS,
    TINY_TASKS,
    byte_model,
    byte_tokenizer,
    write_bundle,
)

from eval import core as C


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return byte_model()


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


def hand_losses(model, prompts: list[str], spans: list[tuple[int, int]]) -> list[tuple[float, bool]]:
    """One plain forward per prompt: mean NLL over the byte span [s, e) of [BOS] + bytes, and greedy match."""
    out = []
    for prompt, (s, e) in zip(prompts, spans):
        ids = [256, *prompt.encode()]
        with torch.no_grad():
            logp = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
        nll = [-logp[t - 1, ids[t]].item() for t in range(s, e)]
        exact = all(logp[t - 1].argmax().item() == ids[t] for t in range(s, e))
        out.append((sum(nll) / len(nll), exact))
    return out


def fewshot_by_spec(n: int, idx: int, k: int) -> list[int]:
    return random.Random(1234 + idx).sample([i for i in range(n) if i != idx], k) if k else []


def test_prompts_follow_the_original_templates():
    item, shot = MC_ITEMS[0], MC_ITEMS[1]
    assert C.render_prompts("multiple_choice", item, ": ", [shot]) == [
        "Grass is: green\n\nSky is: blue", "Grass is: green\n\nSky is: green", "Grass is: green\n\nSky is: bright red"]
    assert C.render_prompts("schema", SCHEMA_ITEMS[0], " ", [SCHEMA_ITEMS[1]]) == [
        "It rained and the dog got wet.\n\nThe cup fell, so Tom cleaned it up.",
        "It rained and the dog got wet.\n\nThe cup fell, so Ann cleaned it up."]
    # LM: contexts are trimmed, and "without" is stripped so it stays a token prefix of "with"
    assert C.render_prompts("language_modeling", LM_ITEMS[2], " ", [LM_ITEMS[0]]) == [
        "one two three four\n\nhello", "one two three four\n\nhello world"]
    assert C.common_length([[1, 2, 3], [1, 2, 4], [1, 2]], "left") == 2
    assert C.common_length([[5, 1, 9], [7, 9]], "right") == 1
    data = list(range(10))
    expected = data[:]
    random.Random(1337).shuffle(expected)
    assert C.sample_items(data, 4) == expected[:4] and C.sample_items(data, -1) == expected


@pytest.mark.parametrize("label", list(TINY_TASKS))
def test_every_task_type_matches_a_hand_computation(model, tokenizer, label):
    uri, kind, shots, delim, rb, items = TINY_TASKS[label]
    task = C.CoreTask(label, uri, shots, kind, delim, rb)
    expected = []
    for idx, item in enumerate(items):
        fewshot = [items[i] for i in fewshot_by_spec(len(items), idx, shots)]
        if kind == "multiple_choice":
            prefix = "".join(f"{ex['query']}{delim}{ex['choices'][ex['gold']]}\n\n" for ex in fewshot)
            prompts = [f"{prefix}{item['query']}{delim}{c}" for c in item["choices"]]
            common = C.common_length([p.encode() for p in prompts], "left")
            spans = [(1 + common, 1 + len(p.encode())) for p in prompts]
        elif kind == "schema":
            prefix = "".join(f"{ex['context_options'][ex['gold']]}{delim}{ex['continuation']}\n\n" for ex in fewshot)
            prompts = [f"{prefix}{o}{delim}{item['continuation']}" for o in item["context_options"]]
            suffix = C.common_length([p.encode() for p in prompts], "right")
            spans = [(1 + len(p.encode()) - suffix, 1 + len(p.encode())) for p in prompts]
        else:
            prefix = "".join(f"{ex['context'].strip()}{delim}{ex['continuation']}\n\n" for ex in fewshot)
            without = (prefix + item["context"].strip() + delim).strip()
            prompts = [prefix + item["context"].strip() + delim + item["continuation"]]
            spans = [(1 + len(without.encode()), 1 + len(prompts[0].encode()))]
        scores = hand_losses(model, prompts, spans)
        if kind == "language_modeling":
            expected.append(scores[0][1])
        else:
            losses = [s[0] for s in scores]
            expected.append(losses.index(min(losses)) == item["gold"])
        # the library's rows and scores for the same item
        rows = C.item_rows(task, tokenizer, items, idx, 256)
        assert [(len(t), s, e) for t, s, e in rows] == [(1 + len(p.encode()), s, e) for p, (s, e) in zip(prompts, spans)]
        got = C.score_rows(model, rows, pad_id=256)
        assert [g.mean_loss for g in got] == pytest.approx([s[0] for s in scores], rel=1e-4, abs=1e-5)
        assert [g.exact for g in got] == [s[1] for s in scores]
    result = C.evaluate_task(model, tokenizer, task, items)
    assert result.correct == expected
    assert result.accuracy == pytest.approx(sum(expected) / len(expected))
    assert result.centered == pytest.approx((result.accuracy - rb / 100) / (1 - rb / 100))


def test_lm_item_that_the_model_predicts_is_correct(tokenizer):
    """A model that always predicts the next byte of the continuation gets the LM item right."""
    text = "hello world"

    class Oracle(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.dummy = torch.nn.Parameter(torch.zeros(1))
            self.config = type("Config", (), {"model_type": "oracle"})()

        def forward(self, input_ids, attention_mask=None, use_cache=False):
            ids = [256, *text.encode()]
            logits = torch.zeros(*input_ids.shape, 265)
            for t in range(input_ids.shape[1] - 1):
                logits[:, t, ids[t + 1] if t + 1 < len(ids) else 0] = 10.0
            return type("Out", (), {"logits": logits})()

    task = C.CoreTask("lm", "x", 0, "language_modeling")
    assert C.evaluate_task(Oracle(), tokenizer, task, [{"context": "hello", "continuation": "world"}]).accuracy == 1.0
    assert C.evaluate_task(Oracle(), tokenizer, task, [{"context": "hello", "continuation": "there"}]).accuracy == 0.0


def test_batched_scoring_equals_one_forward_per_row(model, tokenizer):
    gen = random.Random(0)
    rows = []
    for _ in range(23):
        n = gen.randint(5, 60)
        tokens = [256] + [gen.randrange(256) for _ in range(n)]
        start = gen.randint(1, n)
        rows.append((tokens, start, gen.randint(start + 1, n + 1)))
    one = C.score_rows(model, rows, pad_id=256, max_batch_rows=1)
    batched = C.score_rows(model, rows, pad_id=256, max_batch_rows=64, max_batch_tokens=600)
    assert [b.mean_loss for b in batched] == pytest.approx([o.mean_loss for o in one], rel=1e-4, abs=1e-5)
    assert [b.exact for b in batched] == [o.exact for o in one]


def test_any_hf_causal_lm_with_cropping(tokenizer):
    """A GPT-2 (learned positions, 32 of them) is scored from its logits; long rows keep their last 32 tokens."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=265, n_positions=32, n_embd=32, n_layer=2, n_head=2)).eval()
    assert C.model_max_seq_len(gpt2) == 32
    task = C.CoreTask("long", "x", 0, "multiple_choice")
    items = [{"query": "x" * 50 + " pick", "choices": ["one", "two"], "gold": 1}]
    rows = C.item_rows(task, tokenizer, items, 0, 256, max_seq_len=32)
    assert all(len(t) == 32 and 1 <= s < e == 32 for t, s, e in rows)
    scores = C.score_rows(gpt2, rows, pad_id=256)
    with torch.no_grad():
        logp = gpt2(torch.tensor([rows[1][0]])).logits[0].log_softmax(-1)
    t, s, e = rows[1]
    assert scores[1].mean_loss == pytest.approx(-sum(logp[i - 1, t[i]].item() for i in range(s, e)) / (e - s), rel=1e-4)
    assert C.evaluate_task(gpt2, tokenizer, task, items).num_items == 1


def test_evaluate_core_aggregates_and_writes_csv(model, tokenizer, tmp_path):
    bundle = C.load_bundle(write_bundle(tmp_path / "bundle"))
    result = C.evaluate_core(model, tokenizer, bundle, max_per_task=3)
    assert list(result["tasks"]) == list(TINY_TASKS)
    assert all(r["num_items"] == 3 for r in result["tasks"].values())
    assert result["core"] == pytest.approx(sum(r["centered"] for r in result["tasks"].values()) / 3)
    assert result["bundle"]["subset"] is False and "winogrande" in result["bundle"]["missing_core_tasks"]
    lines = C.write_core_csv(result, tmp_path / "core.csv").read_text().splitlines()
    assert lines[0] == "Task,Accuracy,Centered" and lines[-1].startswith("CORE,,")


def test_bundle_errors_name_the_file_and_field(tmp_path, tokenizer):
    root = write_bundle(tmp_path / "b")
    bundle = C.read_bundle(root)
    path = root / "eval_data" / "mc" / "tiny_mc.jsonl"
    path.write_text(json.dumps({"query": "q", "choices": ["a", "b"], "gold": 5}) + "\n")
    with pytest.raises(ValueError, match=r"tiny_mc\.jsonl:1: field 'gold' = 5 is out of range for 2 choices"):
        bundle.load_items(bundle.task("tiny_mc"))
    path.write_text('{"query": "q", "choices": "ab", "gold": 0}\n')
    with pytest.raises(ValueError, match="field 'choices' must be list"):
        bundle.load_items(bundle.task("tiny_mc"))
    (root / "eval_meta_data.csv").write_text("Eval Task,Random baseline\ntiny_mc,25\n")
    with pytest.raises(ValueError, match="no 'Random baseline' row for task 'tiny_schema'"):
        C.read_bundle(root)
    (root / "core.yaml").write_text("icl_tasks:\n- {label: x, dataset_uri: a, num_fewshot: [0], icl_task_type: essay}\n")
    with pytest.raises(ValueError, match="icl_task_type 'essay' is not one of multiple_choice, schema, language_modeling"):
        C.read_bundle(root)
    with pytest.raises(ValueError, match="is not a CORE eval bundle: core.yaml is missing"):
        C.read_bundle(tmp_path)
    with pytest.raises(KeyError, match="no task 'nope'"):
        bundle.task("nope")


def test_download_unzips_once_into_the_cache(tmp_path):
    src = write_bundle(tmp_path / "src" / "eval_bundle")
    archive = tmp_path / "eval_bundle.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for f in src.rglob("*"):
            z.write(f, f.relative_to(src.parent))
    cache = tmp_path / "cache"
    bundle = C.load_bundle(archive.as_uri(), cache_dir=cache)
    assert bundle.root == cache / "eval_bundle" and [t.label for t in bundle.tasks] == list(TINY_TASKS)
    archive.unlink()
    shutil.rmtree(src)  # the second call must not download again
    assert C.download_bundle(archive.as_uri(), cache) == cache / "eval_bundle"
    with pytest.raises(ValueError, match="could not download the CORE eval bundle"):
        C.download_bundle((tmp_path / "missing.zip").as_uri(), tmp_path / "other")


def test_offline_core_subset_bundle(tmp_path):
    from eval.core_subset import SUBSET_TASKS, build_core_subset

    bundle = C.load_bundle(build_core_subset(tmp_path / "subset"))
    info = bundle.describe()
    assert bundle.subset and info["name"].startswith("CORE subset (14/22")
    assert set(info["tasks"]) == set(SUBSET_TASKS) and len(info["missing_core_tasks"]) == 8
    assert info["tasks"] == [t for t in C.DCLM_CORE_TASKS if t in SUBSET_TASKS]  # DCLM's order
    expected = {"copa": (100, 50.0, 0), "boolq": (3270, 62.0, 10), "winogrande": (1267, 50.0, 0),
                "lambada_openai": (5153, 0.0, 0)}
    for label, (n, rb, shots) in expected.items():
        task = bundle.task(label)
        assert (len(bundle.load_items(task)), task.random_baseline, task.num_fewshot) == (n, rb, shots)
    arc = bundle.task("arc_easy")
    assert arc.continuation_delimiter == "\nAnswer: " and arc.num_fewshot == 10
    assert bundle.load_items(arc)[0] == {"query": "Question: Which technology was developed most recently?",
                                         "choices": ["cellular telephone", "television", "refrigerator", "airplane"],
                                         "gold": 0}
    assert not math.isnan(C.centered_accuracy(0.5, arc.random_baseline))
    assert build_core_subset(tmp_path / "subset") == tmp_path / "subset"  # built once
