"""RL with TRL's GRPOTrainer: rollouts run nanochat's engine with the calculator, forced tool output is never
reinforced, the reward reads `#### n`, and two GRPO steps train with the tool."""

from __future__ import annotations

import json

import pytest
from datasets import Dataset
from sft_testdata import TOOL_SCRIPT, scripted_model, write_base

from training import rl as R

PROMPT = [{"role": "user", "content": [{"type": "text", "text": "What is 3+4?"}]}]


class FakeTrainer:
    """The bits of GRPOTrainer a rollout reads."""

    def __init__(self, model, tokenizer, args):
        from accelerate import Accelerator

        self.model, self.processing_class, self.args = model, tokenizer, args
        self.accelerator = Accelerator(cpu=True)
        self.state = type("State", (), {"global_step": 0})()


def rl_config(tmp_path, model_dir, **overrides) -> R.NanoChatGRPOConfig:
    kwargs = dict(output_dir=str(tmp_path / "rl"), model=str(model_dir), num_generations=4, per_device_train_batch_size=4,
                  gradient_accumulation_steps=2, max_steps=2, max_completion_length=16, use_cpu=True, disable_tqdm=True,
                  seed=0)
    kwargs.update(overrides)
    return R.NanoChatGRPOConfig(**kwargs)


def test_rollouts_run_the_calculator_and_mask_its_output(tmp_path, tokenizer):
    model = scripted_model(tokenizer, TOOL_SCRIPT)
    cfg = rl_config(tmp_path, tmp_path)
    rollout = R.ToolRollout(seed=1)
    out = rollout([PROMPT] * 4, FakeTrainer(model, tokenizer, cfg))  # TRL repeats each prompt num_generations times
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in
           ("<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>", "<|assistant_end|>")}
    assert len(out["completion_ids"]) == len(out["prompt_ids"]) == len(out["env_mask"]) == 4 and out["logprobs"] is None
    assert out["tool_calls"] == [1, 1, 1, 1]
    for completion, mask in zip(out["completion_ids"], out["env_mask"]):
        text = tokenizer.decode(completion)
        expr = text.split("<|python_start|>")[1].split("<|python_end|>")[0]
        result = str(eval(expr))  # the calculator's answer was forced into the sample
        assert f"<|output_start|>{result}<|output_end|>" in text
        start, end = completion.index(ids["<|output_start|>"]), completion.index(ids["<|output_end|>"])
        assert mask[start:end + 1] == [0] * (end - start + 1)  # forced: context, never reinforced
        assert completion[-1] == ids["<|assistant_end|>"] and mask[-1] == 0  # stop token: not reinforced either
        assert sum(mask) == len(completion) - (end - start + 1) - 1
    rewards = R.answer_reward([[{"role": "assistant", "content": tokenizer.decode(c, skip_special_tokens=True)}]
                               for c in out["completion_ids"]], ["7"] * 4)
    assert set(rewards) <= {0.0, 1.0}


def test_two_grpo_steps_with_the_tool(tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM

    model_dir = write_base(tmp_path / "sft", tokenizer, model=scripted_model(tokenizer, TOOL_SCRIPT))
    data = Dataset.from_list([{"prompt": PROMPT, "answer": "7"}] * 8)
    summary = R.run(rl_config(tmp_path, model_dir), data)
    assert summary["steps"] == 2 and summary["rollout_calls"] == 2
    logged = [h for h in summary["history"] if "reward" in h]
    assert len(logged) == 2 and all(0.0 <= h["reward"] <= 1.0 for h in logged)
    assert any(h["reward_std"] > 0 for h in logged)  # rewards differ inside a group: a real policy gradient
    before = AutoModelForCausalLM.from_pretrained(model_dir).lm_head.weight
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "rl").lm_head.weight
    assert (after - before).abs().max() > 0
    assert json.loads((tmp_path / "rl" / "summary.json").read_text())["task"] == "gsm8k"


def test_rl_config_and_data_errors(tmp_path, tokenizer, base_dir):
    with pytest.raises(ValueError, match="--task must be one of gsm8k, spelling_bee"):
        rl_config(tmp_path, base_dir, task="mmlu")
    with pytest.raises(ValueError, match="divisible by num_generations"):
        rl_config(tmp_path, base_dir, num_generations=3)
    with pytest.raises(ValueError, match="missing \\['answer'\\]"):
        R.run(rl_config(tmp_path, base_dir), Dataset.from_list([{"prompt": PROMPT}]))
    data = R.prompt_dataset("spelling_bee", size=3)
    assert set(data.column_names) == {"answer", "prompt"}
    assert data[0]["prompt"][-1]["role"] == "user"
    assert R.answer_reward(["#### 3", [{"role": "assistant", "content": "so #### 4"}]], ["3", "5"]) == [1.0, 0.0]
    assert R.answer_reward(["x"], ["1"]) == [0.0]
