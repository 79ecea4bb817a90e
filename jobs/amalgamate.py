"""The whole job: transfer set -> confidence statistics -> distillation -> evaluation -> export.

    python jobs/amalgamate.py --config jobs/configs/smoke.yaml [section.key=value ...]
    ray job submit --working-dir . -- python jobs/amalgamate.py --config jobs/configs/agnews.yaml

Rerunning the same command resumes: finished stages are skipped, an unfinished one continues
(transfer-set shards, the last training checkpoint).
"""

import os
import sys

from dfkd_ray.config import parse_job_args


def main() -> int:
    cfg = parse_job_args("Data-free amalgamation of teacher classifiers into one student.")

    import ray

    from dfkd_ray.orchestration.runtime import init_local_ray, report_user_error, user_errors
    from dfkd_ray.orchestration.amalgamate import run_amalgamate

    if cfg.ray.address is None and "RAY_ADDRESS" not in os.environ:
        # Local Ray: logical CPUs beyond the train workers' so dataset reads always get one.
        r = cfg.ray
        need = r.num_train_workers * r.cpus_per_train_worker + r.num_generation_actors * r.cpus_per_generation_actor
        init_local_ray(max(os.cpu_count() or 1, int(need) + 2))
    else:
        ray.init(address=cfg.ray.address, log_to_driver=True)
    try:
        run_amalgamate(cfg)
    except user_errors() as e:  # a problem the user fixes: the message, no traceback, exit 2
        return report_user_error(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
