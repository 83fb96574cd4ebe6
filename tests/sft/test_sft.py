"""SFT with TRL: exactly nanochat's supervised tokens, packed == unpacked, the loss goes down, nanochat's
optimizer start and schedules, LoRA, and the guards against TRL's silent failure modes."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from datasets import Dataset
from sft_testdata import GSM8K_ROWS, SEQ_LEN, SMOLTALK_ROWS, write_base, write_jsonl

from modeling_nanochat.tokenization_nanochat import render_conversation
from training import sft as S
from training.tasks import build_mixture, load_task


@pytest.fixture(scope="module")
def conversations(tmp_path_factory):
    """24 conversations: spelling with tool calls, GSM8K-style tool calls, identity, multi-turn chat."""
    root = tmp_path_factory.mktemp("data")
    write_jsonl(root / "gsm8k.jsonl", GSM8K_ROWS)
    write_jsonl(root / "smol.jsonl", SMOLTALK_ROWS)
    parts = [("bee", load_task("spelling_bee", size=8), 1), ("gsm8k", load_task("gsm8k", source=str(root / "gsm8k.jsonl")), 1),
             ("identity", load_task("identity", n=8), 1), ("smol", load_task("smoltalk", source=str(root / "smol.jsonl")), 1),
             ("spell", load_task("simple_spelling", size=3), 1)]
    return build_mixture(parts).select_columns(["messages"])


def config(tmp_path, base_dir, **overrides) -> S.NanoChatSFTConfig:
    kwargs = dict(output_dir=str(tmp_path / "out"), base=str(base_dir), max_steps=4, eval_strategy="no", seed=0,
                  use_cpu=True, disable_tqdm=True, save_strategy="no", chatcore_every=-1)
    kwargs.update(overrides)
    return S.NanoChatSFTConfig(**kwargs)


def documents(packed: Dataset):
    """(input_ids, labels) of every conversation inside the packed rows."""
    for row in packed:
        start = 0
        for length in row["seq_lengths"]:
            yield row["input_ids"][start:start + length], row["labels"][start:start + length]
            start += length


def reference_loss(model, tokenizer, rows) -> float:
    """Mean loss over nanochat's supervised tokens, with the model's own forward, one conversation at a time."""
    total, count = 0.0, 0
    with torch.no_grad():
        for messages in rows:
            ids, mask = render_conversation(tokenizer, messages, max_tokens=SEQ_LEN)
            labels = torch.tensor([i if m else -100 for i, m in zip(ids, mask)])
            n = int((labels[1:] != -100).sum())
            total += model(input_ids=torch.tensor([ids]), labels=labels[None]).loss.item() * n
            count += n
    return total / count


def test_packed_rows_supervise_exactly_nanochats_mask(tmp_path, base_dir, tokenizer, conversations):
    trainer = S.build_trainer(config(tmp_path, base_dir), conversations)
    reference = {}
    for row in conversations:
        ids, mask = render_conversation(tokenizer, row["messages"], max_tokens=SEQ_LEN)
        reference[tuple(ids)] = [i if m else -100 for i, m in zip(ids, mask)]
    docs = list(documents(trainer.train_dataset))
    assert len(docs) == len(conversations) and len(trainer.train_dataset) < len(docs)  # several per row
    for ids, labels in docs:
        assert labels == reference[tuple(ids)]
    stats = trainer.supervision["train"]
    assert stats["supervised"] == sum(sum(label != -100 for label in v) for v in reference.values())
    assert stats["assistant_end"] >= len(conversations) - 2  # long ones may be cut before their end
    assert trainer.args.gradient_accumulation_steps == 1 and trainer.args.max_length == SEQ_LEN  # from summary.json


def packed_and_unpacked_losses(trainer):
    """TRL's loss on one packed padding-free row, on the same conversations right-padded into a batch, and the
    token-weighted mean of the model's own loss on each conversation alone."""
    packed = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    assert packed["input_ids"].shape[0] == 1 and "attention_mask" not in packed  # one padding-free row
    starts = (packed["position_ids"][0] == 0).nonzero().flatten().tolist() + [packed["input_ids"].shape[1]]
    assert len(starts) > 2
    docs = [(packed["input_ids"][0, a:b], packed["labels"][0, a:b]) for a, b in zip(starts, starts[1:])]
    width, device = max(len(ids) for ids, _ in docs), packed["input_ids"].device
    padded = {"input_ids": torch.zeros(len(docs), width, dtype=torch.long, device=device),
              "labels": torch.full((len(docs), width), -100, device=device),
              "attention_mask": torch.zeros(len(docs), width, dtype=torch.long, device=device)}
    for i, (ids, labels) in enumerate(docs):
        padded["input_ids"][i, :len(ids)], padded["labels"][i, :len(ids)] = ids, labels
        padded["attention_mask"][i, :len(ids)] = 1
    model = trainer.model.eval()
    with torch.no_grad():
        loss_packed = trainer.compute_loss(model, dict(packed))
        loss_padded = trainer.compute_loss(model, padded)
        per_doc = [(model(input_ids=ids[None], labels=labels[None]).loss, int((labels[1:] != -100).sum())) for ids, labels in docs]
    return loss_packed, loss_padded, sum(loss * n for loss, n in per_doc) / sum(n for _, n in per_doc)


def test_packed_loss_equals_unpacked_loss(tmp_path, base_dir, conversations):
    packed, padded, separate = packed_and_unpacked_losses(S.build_trainer(config(tmp_path, base_dir), conversations))
    torch.testing.assert_close(packed, padded, atol=2e-5, rtol=0)
    torch.testing.assert_close(packed, separate, atol=2e-5, rtol=0)


@pytest.mark.gpu
def test_packed_loss_equals_unpacked_loss_on_cuda(tmp_path, base_dir, conversations):
    trainer = S.build_trainer(config(tmp_path, base_dir, use_cpu=False), conversations)
    assert next(trainer.model.parameters()).is_cuda and trainer.model.model.embed_tokens.weight.dtype == torch.bfloat16
    packed, padded, separate = packed_and_unpacked_losses(trainer)
    torch.testing.assert_close(packed, padded, atol=3e-2, rtol=0)
    torch.testing.assert_close(packed, separate, atol=3e-2, rtol=0)


def test_a_few_steps_lower_the_loss_and_save_a_chat_model(tmp_path, base_dir, tokenizer, conversations):
    from transformers import AutoModelForCausalLM

    summary = S.run(config(tmp_path, base_dir, max_steps=8, eval_strategy="steps", eval_steps=4), conversations,
                    conversations.select(range(4)))
    rows = conversations["messages"]
    before = reference_loss(AutoModelForCausalLM.from_pretrained(base_dir), tokenizer, rows)
    after = reference_loss(AutoModelForCausalLM.from_pretrained(tmp_path / "out"), tokenizer, rows)
    assert after < before - 0.5, (before, after)
    assert summary["steps"] == 8 and summary["settings"]["matrix_lr"] == 0.02
    evals = [(h["step"], h["eval_loss"]) for h in summary["history"] if "eval_loss" in h]
    assert [step for step, _ in evals] == [4, 8] and evals[1][1] < evals[0][1] and summary["eval_loss"] == evals[1][1]
    saved = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert saved["supervision"]["train"]["packed_rows"] < saved["supervision"]["train"]["examples"]


def test_optimizer_starts_from_the_base_runs_state(tmp_path, base_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    from training.muon import MuonAdamW, nanochat_param_groups

    base = write_base(tmp_path / "base", tokenizer, seed=3)
    model = AutoModelForCausalLM.from_pretrained(base)
    pretrain_opt = MuonAdamW(nanochat_param_groups(model, weight_decay=0.3, batch_lr_scale=0.5))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    pretrain_opt.step()
    ckpt = base / "checkpoints" / "step-000003"
    ckpt.mkdir(parents=True)
    torch.save(pretrain_opt.state_dict(), ckpt / "optimizer.bin")
    (ckpt / "COMPLETE").write_text("{}")
    assert S.latest_optimizer_state(base) == ckpt / "optimizer.bin"

    lrs = {"unembedding_lr": 0.008, "embedding_lr": 0.3, "matrix_lr": 0.02}
    fresh = S.SFTOptimizerFactory()(model, **lrs)
    loaded = S.SFTOptimizerFactory()(model, init_lr_frac=0.8, optimizer_state=str(ckpt / "optimizer.bin"), **lrs)
    for g_fresh, g_loaded, g_pre in zip(fresh.param_groups, loaded.param_groups, pretrain_opt.param_groups):
        assert g_loaded["lr"] == pytest.approx(0.8 * g_fresh["lr"]) and g_loaded["initial_lr"] == g_loaded["lr"]
        assert g_loaded["weight_decay"] == g_pre["weight_decay"]  # loaded values persist (spec §7.1)
    muon = next(i for i, g in enumerate(loaded.param_groups) if g["kind"] == "muon")
    p = loaded.param_groups[muon]["params"][0]
    torch.testing.assert_close(loaded.state[p]["momentum_buffer"], pretrain_opt.state[p]["momentum_buffer"])

    other = write_base(tmp_path / "other", tokenizer, model=AutoModelForCausalLM.from_config(
        model.config.__class__(**{**model.config.to_dict(), "use_value_embeds": False})))
    with pytest.raises(ValueError, match="has groups .* this model has"):
        S.SFTOptimizerFactory()(AutoModelForCausalLM.from_pretrained(other), optimizer_state=str(ckpt / "optimizer.bin"), **lrs)


def test_schedules_follow_spec_7_2():
    assert [S.sft_lr_multiplier(p) for p in (0.0, 0.5, 0.75, 1.0)] == [1.0, 1.0, 0.5, 0.0]
    assert S.sft_lr_multiplier(0.05, warmup_ratio=0.1) == pytest.approx(0.5)
    assert S.sft_lr_multiplier(1.0, final_lr_frac=0.1) == pytest.approx(0.1)
    assert [S.sft_muon_momentum(s) for s in (0, 150, 300, 1000)] == pytest.approx([0.85, 0.9, 0.95, 0.95])
    from training.muon import MuonAdamW

    w = torch.nn.Parameter(torch.zeros(4, 4))
    opt = MuonAdamW([{"kind": "muon", "params": [w], "lr": 0.02, "initial_lr": 0.02}])
    schedule = S.NanoChatSFTSchedule(opt, num_training_steps=4)
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()  # no gradients: nothing moves
        schedule.step()
    assert lrs == pytest.approx([0.02, 0.02, 0.02, 0.01])
    assert opt.param_groups[0]["momentum"] == pytest.approx(S.sft_muon_momentum(4))


def test_inherited_settings_cli_wins_then_base_then_fallback(tmp_path, base_dir):
    cfg = config(tmp_path, base_dir, matrix_lr=0.05)
    summary = {"config": {"max_seq_len": 512, "device_batch_size": 4, "total_batch_size": -1, "embedding_lr": 0.2},
               "plan": {"total_batch_size": 4096}}
    got = S.inherited_settings(cfg, summary)
    assert got == {"max_seq_len": 512, "device_batch_size": 4, "total_batch_size": 4096, "embedding_lr": 0.2,
                   "unembedding_lr": 0.004, "matrix_lr": 0.05}
    assert S.inherited_settings(config(tmp_path, base_dir), {}) == S.FALLBACKS


def test_lora_adapter_saves_loads_and_merges(tmp_path, base_dir, conversations):
    from transformers import AutoModelForCausalLM

    S.run(config(tmp_path, base_dir, max_steps=2, lora=True, lora_r=4), conversations)
    adapter = tmp_path / "out" / "adapter"
    assert (adapter / "adapter_config.json").is_file()
    assert json.loads((adapter / "adapter_config.json").read_text())["target_modules"]
    ids = torch.tensor([[5, 60, 61, 62, 300, 301, 7]])
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(base_dir).eval()(ids).logits
        with_adapter = S.load_lora(base_dir, adapter).eval()(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()(ids).logits
        remerged = AutoModelForCausalLM.from_pretrained(S.merge_lora(base_dir, adapter, tmp_path / "m")).eval()(ids).logits
    assert (with_adapter - base).abs().max() > 1e-4  # the adapter learned something
    torch.testing.assert_close(merged, with_adapter, atol=1e-4, rtol=0)
    torch.testing.assert_close(remerged, merged, atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- guards
def test_base_folder_that_is_not_ours_is_refused(tmp_path, base_dir, conversations):
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type is 'llama', not 'nanochat_hf'"):
        S.build_trainer(config(tmp_path, tmp_path / "llama"), conversations)
    with pytest.raises(ValueError, match="no config.json"):
        S.build_trainer(config(tmp_path, tmp_path), conversations)
    assert S.main(["--base", str(tmp_path / "llama"), "--output_dir", str(tmp_path / "x")]) == 2


def test_bad_datasets_and_batch_geometry_are_refused(tmp_path, base_dir, conversations):
    with pytest.raises(ValueError, match="needs a 'messages' column"):
        S.build_trainer(config(tmp_path, base_dir), Dataset.from_dict({"text": ["hello"]}))
    with pytest.raises(ValueError, match="dataset is empty"):
        S.build_trainer(config(tmp_path, base_dir), conversations.select([]))
    with pytest.raises(ValueError, match="not a multiple of device_batch_size"):
        S.build_trainer(config(tmp_path, base_dir, total_batch_size=1000), conversations)


def test_all_masked_batch_and_broken_packing_are_caught(tmp_path, base_dir, conversations, monkeypatch):
    trainer = S.build_trainer(config(tmp_path, base_dir), conversations)
    batch = {"input_ids": torch.tensor([[1, 2, 3]]), "labels": torch.full((1, 3), -100)}
    with pytest.raises(S.SFTDataError, match="no supervised tokens"):
        trainer.training_step(trainer.model, batch)

    import trl.data_utils

    real_pack = trl.data_utils.pack_dataset

    def lossy_pack(dataset, *args, **kwargs):  # a packer that shifts the labels by one position
        packed = real_pack(dataset, *args, **kwargs)
        return packed.map(lambda row: {"labels": [-100] + row["labels"][:-1]})

    monkeypatch.setattr(trl.data_utils, "pack_dataset", lossy_pack)
    with pytest.raises(S.SFTDataError, match="packing changed the supervised tokens"):
        S.build_trainer(config(tmp_path, base_dir), conversations)


def test_templates_that_do_not_train_nanochats_tokens_are_refused(tokenizer):
    broken = copy.deepcopy(tokenizer)
    broken.chat_template = ("{{ bos_token }}{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}"
                            "{{ m.content }}{% endgeneration %}<|assistant_end|>{% else %}{{ m.content }}{% endif %}"
                            "{% endfor %}")
    with pytest.raises(S.SFTDataError, match="does not supervise <\\|assistant_end\\|>"):
        S.check_template_masks(broken, [])
    with pytest.raises(S.SFTDataError, match="does not reproduce nanochat's rendering"):
        S.check_template_masks(broken, [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]])
    S.check_template_masks(tokenizer, [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]])


def test_chatcore_is_logged_during_training(tmp_path, base_dir, conversations):
    summary = S.run(config(tmp_path, base_dir, max_steps=3, chatcore_every=2, chatcore_max_problems=2,
                           chatcore_tasks="ARC-Easy|SpellingBee", chatcore_max_new_tokens=8), conversations)
    logged = [h for h in summary["history"] if "chatcore/ARC-Easy" in h]
    assert [h["step"] for h in logged] == [2, 3]  # every 2 steps and at the last one
    for h in logged:
        assert 0.0 <= h["chatcore/ARC-Easy"] <= 1.0 and 0.0 <= h["chatcore/SpellingBee"] <= 1.0
        assert "chatcore" not in h  # the ChatCORE aggregate needs all six tasks
