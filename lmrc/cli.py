"""`lmrc segment | eval | train | bench | baseline | app`: one entry point; each command lives beside the code it drives."""
from __future__ import annotations

import argparse
import importlib
import sys

from lmrc.utils.errors import LmrcError
from lmrc.utils.memory import reuse_freed_memory

# command -> module exposing `configure(parser)` and `main(args) -> int`; imported only when used.
COMMANDS = {
    "segment": ("lmrc.inference.command", "segment a video from masks or boxes on any of its frames"),
    "eval": ("lmrc.eval.command", "score results with the official DAVIS protocol, or segment a split and score it"),
    "train": ("lmrc.train.command", "train a model from a YAML config"),
    "bench": ("lmrc.eval.bench", "time every stage of the streaming segmenter"),
    "baseline": ("lmrc.eval.baselines", "copy or optical-flow baselines, for comparison"),
    "export": ("lmrc.inference.onnx_export", "write the per-frame graphs as ONNX (run them with --runtime onnxruntime)"),
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
