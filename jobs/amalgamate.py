"""The whole job: transfer set -> confidence statistics -> distillation -> evaluation -> export.

    python jobs/amalgamate.py --config jobs/configs/smoke.yaml [section.key=value ...]
    ray job submit --working-dir . -- python jobs/amalgamate.py --config jobs/configs/agnews.yaml

Rerunning the same command resumes: finished stages are skipped, an unfinished one continues
(transfer-set shards, the last training checkpoint).
"""

import argparse
import os
import sys

from dfkd_ray.config import ConfigError, load_config


def main() -> int:
    parser = argparse.ArgumentParser(description="Data-free amalgamation of teacher classifiers into one student.")
    parser.add_argument("--config", required=True, help="YAML under jobs/configs/")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args()
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2

    import ray

    from dfkd_ray.orchestration.amalgamate import run_amalgamate

    if cfg.ray.address is None and "RAY_ADDRESS" not in os.environ:
        # Local Ray: logical CPUs beyond the train workers' so dataset reads always get one.
        r = cfg.ray
        need = r.num_train_workers * r.cpus_per_train_worker + r.num_generation_actors * r.cpus_per_generation_actor
        ray.init(num_cpus=max(os.cpu_count() or 1, int(need) + 2), log_to_driver=True, include_dashboard=False)
    else:
        ray.init(address=cfg.ray.address, log_to_driver=True)
    run_amalgamate(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
