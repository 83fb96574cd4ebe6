"""TRL's assistant-only loss path (SFTTrainer dataset preparation) trains exactly nanochat's mask."""

from __future__ import annotations

import pytest
from datasets import Dataset

from modeling_nanochat.tokenization_nanochat import render_conversation

trl = pytest.importorskip("trl")


def test_sft_trainer_labels_equal_the_nanochat_mask(tokenizer, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer
    from trl.chat_template_utils import is_chat_template_stop_token_trained

    # Arrow needs one type per field, so every content is a list of parts (user text parts are concatenated)
    conversation = [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "text", "text": "How many r in strawberry?"}]},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Counting..."},
            {"type": "text", "text": "\n\nLet me check with Python:"},
            {"type": "python", "text": "'strawberry'.count('r')"},
            {"type": "python_output", "text": "3"},
            {"type": "text", "text": "There are 3."},
        ]},
        {"role": "user", "content": [{"type": "text", "text": "Thanks! ünïcödé 日本"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "You're welcome."}]},
    ]
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2))
    args = SFTConfig(output_dir=str(tmp_path), assistant_only_loss=True, report_to="none", bf16=False,
                     use_cpu=True, packing=False, max_length=None, activation_checkpointing=False)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list([{"messages": conversation}]),
                         processing_class=tokenizer)
    row = trainer.train_dataset[0]
    ids, mask = render_conversation(tokenizer, conversation)
    assert row["input_ids"] == ids
    assert row["labels"] == [i if m else -100 for i, m in zip(ids, mask)]
    assert is_chat_template_stop_token_trained(tokenizer)  # <|assistant_end|> is inside the generation block
