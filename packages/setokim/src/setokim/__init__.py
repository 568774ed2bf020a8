"""setokim."""
