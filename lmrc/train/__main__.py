"""`python -m lmrc.train --config ...`: the same as `lmrc train`, runnable under torchrun for several processes:

    torchrun --nproc_per_node 4 -m lmrc.train --config configs/lmrc-r50-paper.yaml --out runs/r50
"""
from __future__ import annotations

import argparse
import os
import sys

from lmrc.utils.errors import LmrcError


def main(argv: list[str] | None = None) -> int:
    import torch

    from lmrc.utils.memory import reuse_freed_memory

    reuse_freed_memory()

    from lmrc.train import command

    parser = argparse.ArgumentParser(prog="python -m lmrc.train", description="train a model from a YAML config")
    command.configure(parser)
    args = parser.parse_args(argv)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if local > 1 and args.threads is None and not torch.cuda.is_available():
        # Several CPU processes on one machine: split the cores instead of oversubscribing them.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    try:
        return command.main(args)
    except LmrcError as exc:
        print(f"lmrc train: error: {exc}", file=sys.stderr)
        return 2
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
