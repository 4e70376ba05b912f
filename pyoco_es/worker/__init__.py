"""The worker: a Trio actor that claims runs and executes them in warm child processes."""
