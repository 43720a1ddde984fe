"""`lmrc segment | eval | train | bench | baseline | app`: one entry point; each command lives beside the code it drives."""
from __future__ import annotations

import argparse
import ctypes
import importlib
import os
import platform
import sys

from lmrc.errors import LmrcError

# command -> module exposing `configure(parser)` and `main(args) -> int`; imported only when used.
COMMANDS = {
    "segment": ("lmrc.inference.command", "segment a video from masks or boxes on any of its frames"),
    "eval": ("lmrc.eval.command", "score results with the official DAVIS protocol, or segment a split and score it"),
    "train": ("lmrc.train.command", "train a model from a YAML config"),
    "bench": ("lmrc.eval.bench", "time every stage of the streaming segmenter"),
    "baseline": ("lmrc.eval.baselines", "copy or optical-flow baselines, for comparison"),
    "app": ("lmrc.app.command", "a local web page: segment a video from a box, clicks and strokes"),
}


def build_parser(selected: str | None = None) -> argparse.ArgumentParser:
    """Only the selected command's module is imported (and so only its dependencies), keeping `lmrc -h` fast."""
    parser = argparse.ArgumentParser(prog="lmrc", description="Video object segmentation with LMRC.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        command.set_defaults(_module=module)
        if name == selected:
            _load(module).configure(command)
    return parser


def _load(module: str):
    return importlib.import_module(module)


def reuse_freed_memory() -> bool:
    """Keep freed memory in the process for the next frame instead of handing it back to the kernel (glibc only;
    returns whether it applied). A 480p frame allocates and frees tensors of 10-40 MB; glibc maps those afresh and
    unmaps them on free, so the kernel faults in and zeroes every page again on every frame: about 1/8 of
    lmrc-lite's frame time (docs/PERFORMANCE.md). With mmap off and no trimming the heap settles at what one frame
    needs and stays flat over a video. Process-wide, so only the command line does it; LMRC_KEEP_MALLOC=1 opts out."""
    if os.environ.get("LMRC_KEEP_MALLOC") == "1" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(None)
        m_mmap_max, m_trim_threshold = -4, -1  # <malloc.h>
        return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))
    except (OSError, AttributeError):
        return False


def main(argv: list[str] | None = None) -> int:
    reuse_freed_memory()
    argv = sys.argv[1:] if argv is None else argv
    selected = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(selected if selected in COMMANDS else None)
    args = parser.parse_args(argv)
    try:
        return int(_load(args._module).main(args) or 0)
    except LmrcError as exc:
        print(f"lmrc {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lmrc {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
