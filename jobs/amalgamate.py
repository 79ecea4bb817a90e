"""The whole job: transfer set -> confidence statistics -> distillation -> evaluation -> export.

    python jobs/amalgamate.py --config jobs/configs/smoke.yaml [section.key=value ...]
    ray job submit --working-dir . -- python jobs/amalgamate.py --config jobs/configs/agnews.yaml

Rerunning the same command resumes: finished stages are skipped, an unfinished one continues
(transfer-set shards, the last training checkpoint).
"""

import sys

from dfkd_ray.preflight import parse_job_args


def main() -> int:
    cfg = parse_job_args("Data-free amalgamation of teacher classifiers into one student.")

    from dfkd_ray.orchestration.amalgamate import run_amalgamate
    from dfkd_ray.orchestration.runtime import run_job

    return run_job(cfg, run_amalgamate)


if __name__ == "__main__":
    sys.exit(main())
