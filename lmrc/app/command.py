"""`lmrc app [VIDEO]`: segment a video in the browser from a box, clicks and strokes, forward and backward."""
from __future__ import annotations

import argparse
import signal
import sys

from lmrc.inference.config import add_inference_arguments, inference_config_from_args
from lmrc.utils.errors import LmrcError


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("video", nargs="?", help="a video file or folder of frames to open in every new page")
    parser.add_argument("--port", type=int, default=7860, help="port to listen on (default: 7860; 0 = any free one)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: 127.0.0.1, this machine only; the page can read any "
                             "file the server can, so expose it to a network you trust only)")
    parser.add_argument("--model", choices=("lmrc-lite", "lmrc-r50"), default="lmrc-lite")
    parser.add_argument("--weights", help="weights file (.safetensors) for --model (default: its shipped weights)")
    add_inference_arguments(parser)  # --size, --precision, --mem-every, --top-k, --flip, --device: as `lmrc segment`
    parser.add_argument("--max-frames", type=int, default=1000, metavar="N",
                        help="longest video a page may open, in frames (default: 1000)")
    parser.add_argument("--max-pixels", type=int, default=1920 * 1080, metavar="N",
                        help="largest frame a page may open, in pixels (default: 1920x1080)")
    parser.add_argument("--idle-minutes", type=float, default=30,
                        help="end a page's session (and delete its cached frames) after this long without a "
                             "request (default: 30)")
    parser.add_argument("--verbose", action="store_true", help="log every request")


def main(args: argparse.Namespace) -> int:
    from lmrc.app.engine import Engine
    from lmrc.app.server import App, make_server
    from lmrc.app.session import Limits
    from lmrc.data.video import open_frames
    from lmrc.model.weights import load_model
    from lmrc.utils.device import choose_device, half_precision_warning

    config = inference_config_from_args(args)  # bad values -> LmrcError naming the option
    if args.max_frames < 1 or args.max_pixels < 1 or args.idle_minutes <= 0:
        raise LmrcError("--max-frames, --max-pixels and --idle-minutes must be positive")
    if args.video is not None:
        open_frames(args.video)  # a bad VIDEO is reported now, not in every page
    device = choose_device(config.device)  # --device cuda without a GPU is reported now, not at the first run
    if device.type == "cpu" and (warning := half_precision_warning(config.precision)):
        print(f"lmrc app: warning: {warning}", file=sys.stderr)
    model = load_model(args.model, args.weights)  # each propagation's segmenter runs a copy on config.device
    app = App(Engine(model, config), Limits(args.max_frames, args.max_pixels), video=args.video,
              idle_seconds=args.idle_minutes * 60)
    server = make_server(app, args.host, args.port, verbose=args.verbose)
    host, port = server.server_address[:2]
    print(f"lmrc app: open http://{host}:{port}/ in a browser (Ctrl+C stops the server)", file=sys.stderr)

    def stop(signum, frame):  # `kill` ends the server as Ctrl+C does: caches deleted
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        app.shutdown()  # every session's cached frames are deleted
    return 0
