"""Command-line entry points (asyncclick, run on Trio)."""
