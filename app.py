"""`python app.py`: open the TTRV workbench in the browser (Gradio, on 127.0.0.1).

Starts the background worker (which owns the model and runs the job queue) in this process
and serves the UI. `--help` returns at once: Gradio, torch and the store load only after
the flags are parsed.
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python app.py",
        description="TTRV workbench: adapt a vision-language model to unlabeled images with "
        "test-time reinforcement learning, in the browser.",
    )
    parser.add_argument("--host", default="127.0.0.1",
                        help="Interface to listen on (default: 127.0.0.1, this machine only; "
                        "0.0.0.0 opens it to the network).")  # fmt: skip
    parser.add_argument("--port", type=int, default=7860,
                        help="Port (default: 7860; the next free one if taken).")  # fmt: skip
    parser.add_argument("--data-dir", default=None,
                        help="Where sessions, images and adapters are kept (default: "
                        "$TTRV_DATA_DIR, else the per-user data folder).")  # fmt: skip
    parser.add_argument("--share", action="store_true",
                        help="Also open a temporary public gradio.live link.")  # fmt: skip
    parser.add_argument("--open-browser", action="store_true",
                        help="Open the workbench in the default browser.")  # fmt: skip
    return parser


def free_port(host: str, first: int, tries: int = 50) -> int:
    import socket

    for port in range(first, first + tries):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            # As the server will: a port whose last connections linger in TIME_WAIT after a
            # restart is free to listen on again, not a reason to move to the next port.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise SystemExit(f"No free port in {first}..{first + tries - 1}; pass --port.")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    from sessions import StoreError
    from sessions.store import Store
    from sessions.worker import Worker
    from ui.workbench import create_app, launch_options

    try:
        store = Store(args.data_dir)
    except StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    worker = Worker(store).start()
    demo = create_app(store)
    print(f"Data directory: {store.data_dir}")
    try:
        demo.launch(
            server_name=args.host,
            server_port=free_port(args.host, args.port),
            share=args.share,
            inbrowser=args.open_browser,
            **launch_options(store),
        )
    except KeyboardInterrupt:
        pass
    finally:
        worker.shutdown(timeout=5)
        store.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
