"""setok_tokenizer."""
