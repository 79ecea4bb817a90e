"""Make a transfer set alone (any transfer source), locally or on a Ray cluster.

    python jobs/generate.py --config jobs/configs/smoke.yaml [section.key=value ...]
    ray job submit --working-dir . -- python jobs/generate.py --config jobs/configs/agnews.yaml

Rerunning the same command resumes: finished shards are kept, the rest is made.
"""

import sys

from dfkd_ray.preflight import parse_job_args


def main() -> int:
    cfg = parse_job_args("Make a transfer set with Ray Data.")

    from dfkd_ray.orchestration.generate import run_generate
    from dfkd_ray.orchestration.runtime import run_job

    return run_job(cfg, run_generate)


if __name__ == "__main__":
    sys.exit(main())
