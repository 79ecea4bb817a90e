"""A sweep: Ray Tune trials over the config's ``tune.search_space``, each a job of its own (transfer
set, confidence statistics, Ray Train distillation), ranked by the data-free proxy or by accuracy on
a labelled development file (``tune.dev``).

    python jobs/tune.py --config jobs/configs/smoke_tune.yaml [section.key=value ...]
    ray job submit --working-dir . -- python jobs/tune.py --config jobs/configs/smoke_tune.yaml output.dir=/abs/dir

Writes ``output.dir/tune/``: results.csv and results.md, metric.png, best.yaml (run it with
``jobs/amalgamate.py --config``). Rerunning the same command resumes the sweep; finished trials are kept.
"""

import sys

from dfkd_ray.preflight import parse_job_args


def main() -> int:
    cfg = parse_job_args("A Ray Tune sweep over the config's tune.search_space.")

    from dfkd_ray.orchestration.runtime import run_job
    from dfkd_ray.orchestration.tune import run_tune

    return run_job(cfg, run_tune)


if __name__ == "__main__":
    sys.exit(main())
