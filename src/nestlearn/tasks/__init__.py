"""Synthetic in-context tasks: generators, a training harness and reports. See README.md."""
