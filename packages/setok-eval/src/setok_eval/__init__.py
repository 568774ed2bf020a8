"""setok_eval."""
