"""Ray orchestration: the only layer that imports ``ray``. Each ``run_*`` function is what a job calls."""
