"""Training stages (tokenizer data, pretraining, SFT, RL) built on `modeling_nanochat`."""
