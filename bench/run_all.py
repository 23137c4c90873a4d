"""`make bench`: every speed/memory benchmark in turn, each printing its own table."""

from __future__ import annotations

import importlib


def main() -> None:
    for name in ("bench.grpo_step", "bench.rollout"):
        print(f"\n##### {name}", flush=True)
        importlib.import_module(name).main([])


if __name__ == "__main__":
    main()
