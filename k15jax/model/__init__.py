"""The policy model: its config, the Flax decoder, sharding rules, a reference sampler, the
tokenizer and Hugging Face / orbax conversion."""
