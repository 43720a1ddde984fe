"""`lmrc train --config FILE [--out DIR] [--resume] [--iterations N] [--device D] [--export-weights FILE]`."""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from lmrc.utils.errors import LmrcError


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="training YAML, e.g. configs/lmrc-lite-davis2016.yaml")
    parser.add_argument("--out", default=None, help="run folder for checkpoints, logs and weights "
                        "(default runs/<config name>)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    parser.add_argument("--iterations", type=int, default=None, help="override optim.iterations")
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda or cuda:N")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's choice); on a busy shared CPU 1 is often "
                        "much faster than 2, because idle-spinning threads wait for each other")
    parser.add_argument("--export-weights", metavar="FILE", default=None,
                        help="do not train: write the model of the checkpoint in --out as a .safetensors weights file "
                        "(usable with lmrc segment --weights) and exit")


def main(args: argparse.Namespace) -> int:
    from lmrc.train.config import load_config
    from lmrc.train.trainer import train

    if args.threads is not None:
        import torch

        if args.threads < 1:
            raise LmrcError("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    if args.iterations is not None:
        if args.iterations < 1:
            raise LmrcError("--iterations must be >= 1")
        cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, iterations=args.iterations))
    out = Path(args.out) if args.out else Path("runs") / Path(args.config).stem
    if args.export_weights:
        from lmrc.train.trainer import export_checkpoint_weights

        step, digest = export_checkpoint_weights(cfg, out, Path(args.export_weights))
        print(f"wrote {args.export_weights}: the model at step {step} of {out} (sha256 {digest[:12]})")
        return 0
    result = train(cfg, out, resume=args.resume, device_name=args.device)
    return result.exit_code
