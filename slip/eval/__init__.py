"""Evaluation tasks on frozen models: zero-shot classification (more in later modules)."""
