"""The ``decoder2vec`` command line: ``encode``, ``eval``, and the commands other modules register.

Each command lives next to the code it drives and exposes ``register(subparsers)``; this file only
collects them (see :data:`COMMAND_MODULES`). Errors the user can fix print one line, not a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

from .config import add_arguments

__all__ = ["main"]

# Modules that add sub-commands; each defines `register(subparsers)`.
COMMAND_MODULES = [
    "decoder2vec.cli",
    "decoder2vec.embed",
    "decoder2vec.index",
    "decoder2vec.export",
    "decoder2vec.serve",
    "decoder2vec.eval.cli",
    "decoder2vec.train.cli",
]


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every command that loads an Encoder shares (generated from EncoderConfig)."""
    from .model import EncoderConfig

    parser.add_argument("--model", default="smollm2-135m", help="model folder, hub id, .gguf file or short name")
    parser.add_argument("--adapter", nargs="+", default=None, help="PEFT LoRA adapter folder(s) to load on top")
    parser.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: float32 on CPU)")
    parser.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when available)")
    parser.add_argument("--causal", action="store_true", help="keep the causal mask (same as --bidirectional false)")
    parser.add_argument(
        "--quantize",
        choices=("int8",),
        default=None,
        help="int8: dynamic int8 linear layers on the CPU (export: an int8 ONNX graph); see docs/inference.md",
    )
    parser.add_argument(
        "--backend",
        choices=("torch", "onnx"),
        default=None,
        help="torch | onnx (onnxruntime); default: onnx for an ONNX export, else torch (int8 included)",
    )
    add_arguments(parser, EncoderConfig)


def load_encoder(args: argparse.Namespace):
    from .model import Encoder, EncoderConfig

    overrides = {f: getattr(args, f) for f in EncoderConfig.__dataclass_fields__ if getattr(args, f, None) is not None}
    if args.causal:
        overrides["bidirectional"] = False
    return Encoder.from_pretrained(
        args.model,
        adapter=args.adapter,
        dtype=args.dtype,
        device=args.device,
        quantize=getattr(args, "quantize", None),
        backend=getattr(args, "backend", None),
        **overrides,
    )


def read_lines(path: str) -> list[str]:
    """Texts one a line from a file, or from standard input when path is '-'."""
    if path == "-":
        text = sys.stdin.read()
    else:
        if not Path(path).is_file():
            raise FileNotFoundError(f"input file {path!r} not found")
        text = Path(path).read_text(encoding="utf-8")
    return text.splitlines()


def write_npy_atomic(path: str | Path, array) -> None:
    import os

    import numpy as np

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


def _encode(args: argparse.Namespace) -> None:
    texts = read_lines(args.input)
    encoder = load_encoder(args)
    vectors = encoder.encode(
        texts,
        instruction=args.instruction,
        batch_size=args.batch_size,
        normalize=args.normalize,
        show_progress=True,
        dimensions=args.dimensions,
        precision=args.precision,
        devices=args.devices,
    )
    write_npy_atomic(args.output, vectors)
    print(json.dumps({"texts": len(texts), "dim": int(vectors.shape[1]), "output": str(args.output)}))


def register(subparsers) -> None:
    encode = subparsers.add_parser("encode", help="embed texts (one a line) into a .npy file")
    encode.add_argument("input", help="text file with one text a line, or - for standard input")
    encode.add_argument("-o", "--output", required=True, help="where to write the (n, dim) float32 .npy array")
    encode.add_argument("--instruction", default=None, help="instruction the model reads before every text")
    encode.add_argument("--batch-size", type=int, default=32)
    encode.add_argument("--normalize", action="store_true", help="L2-normalize the vectors")
    encode.add_argument("--dimensions", type=int, default=None, help="keep the first N values (Matryoshka)")
    encode.add_argument(
        "--precision", default="float32", help="float32 | int8 | uint8 | binary (packed bits), see vectors.py"
    )
    encode.add_argument(
        "--devices", nargs="+", default=None, help="spread batches over these devices, e.g. cuda:0 cuda:1"
    )
    add_model_arguments(encode)
    encode.set_defaults(handler=_encode)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="decoder2vec", description="Turn decoder-only language models into text encoders."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    from .attention import BidirectionalUnsupportedError
    from .extras import missing_extra_message
    from .sources import ModelSourceError

    try:
        args.handler(args)
    except ImportError as error:  # an optional package of an extra that is not installed: say which extra
        message = missing_extra_message(error)
        if message is None:
            raise
        print(f"decoder2vec: error: {message}", file=sys.stderr)
        return 1
    except (ModelSourceError, BidirectionalUnsupportedError, FileNotFoundError, ValueError, TypeError) as error:
        print(f"decoder2vec: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
