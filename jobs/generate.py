"""Make a transfer set alone (any transfer source), locally or on a Ray cluster.

    python jobs/generate.py --config jobs/configs/smoke.yaml [section.key=value ...]
    ray job submit --working-dir . -- python jobs/generate.py --config jobs/configs/agnews.yaml

Rerunning the same command resumes: finished shards are kept, the rest is made.
"""

import argparse
import sys

from dfkd_ray.config import ConfigError, load_config


def main() -> int:
    parser = argparse.ArgumentParser(description="Make a transfer set with Ray Data.")
    parser.add_argument("--config", required=True, help="YAML under jobs/configs/")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args()
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2

    import ray

    from dfkd_ray.orchestration.generate import run_generate

    ray.init(address=cfg.ray.address, log_to_driver=False)
    run_generate(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
