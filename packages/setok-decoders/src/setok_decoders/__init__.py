"""setok_decoders."""
