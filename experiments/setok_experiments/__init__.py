"""Launch machinery behind experiments/launch.py: compose, plan, submit, record, report."""
