"""Continual learning: streams of tasks, methods, metrics over R[i, j], monitors and reports."""
