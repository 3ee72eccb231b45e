"""The model server's settings and its ``serve-models`` options."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field

from phasestream.modelserver.protocol import DEFAULT_MODEL_ADDRESS

__all__ = ["MAX_REQUEST_BYTES", "ModelServerConfig", "add_arguments", "config_from_args"]

#: largest ``max_request_bytes`` a server accepts (its 0MQ limit is 4 times it)
MAX_REQUEST_BYTES = 64 << 30
#: largest ``max_connections`` a server accepts
MAX_CONNECTIONS = 4096


@dataclass
class ModelServerConfig:
    """Settings of a model server (validated by :meth:`validate`).

    bind : 0MQ address to bind; ``tcp://127.0.0.1:*`` picks a free port
    max_request_bytes : larger requests get an error reply without being decoded
    max_batch_requests : requests taken from the socket per batch
    max_batch_bytes : a batch takes no more requests once those it holds reach this many bytes (default
        ``max_request_bytes``): what one batch holds in memory, with its decoded arrays and outputs, stays
        a few requests' worth however many are queued (before: up to ``max_batch_requests`` of the largest)
    max_connections : connections open at once; more are refused at their handshake (``admission.py``): with
        the bound per connection (``RECEIVE_QUEUE_PER_CONNECTION`` requests of up to 0MQ's ``MAXMSGSIZE``),
        what clients can make the server hold
    folders : artifact folders (default: the packaged pretrained folder and ``PHASESTREAM_MODELS``)
    preload : ``name`` or ``name:version`` of models to load at start-up
    """

    bind: str = DEFAULT_MODEL_ADDRESS
    max_request_bytes: int = 256 << 20
    max_batch_requests: int = 64
    max_batch_bytes: int | None = None
    max_connections: int = 32
    folders: list[str] | None = None
    preload: list[str] = field(default_factory=list)

    def validate(self) -> ModelServerConfig:
        if not self.bind.startswith(("tcp://", "ipc://", "inproc://")):
            raise ValueError(f"bind must be a 0MQ address like tcp://127.0.0.1:5579, got {self.bind!r}")
        if not 1024 <= self.max_request_bytes <= MAX_REQUEST_BYTES:
            raise ValueError(f"max_request_bytes must be in 1024..{MAX_REQUEST_BYTES}, got {self.max_request_bytes}")
        if self.max_batch_requests < 1:
            raise ValueError("max_batch_requests must be >= 1")
        if not 1 <= self.max_connections <= MAX_CONNECTIONS:
            raise ValueError(f"max_connections must be in 1..{MAX_CONNECTIONS}, got {self.max_connections}")
        if self.max_batch_bytes is None:
            self.max_batch_bytes = self.max_request_bytes
        if not 1 <= self.max_batch_bytes <= MAX_REQUEST_BYTES:
            raise ValueError(f"max_batch_bytes must be in 1..{MAX_REQUEST_BYTES}, got {self.max_batch_bytes}")
        return self


def _megabytes(text: str) -> float:
    """``--max-request-mb``: a finite, positive number of MB."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of MB, got {text!r}") from None
    if not math.isfinite(value) or not 0 < value <= MAX_REQUEST_BYTES / (1 << 20):
        raise argparse.ArgumentTypeError(f"expected a number of MB in (0, {MAX_REQUEST_BYTES >> 20}], got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``serve-models`` options (shared with the ``phasestream`` CLI)."""
    parser.add_argument("--bind", default=DEFAULT_MODEL_ADDRESS,
                        help=f"0MQ address to bind (default {DEFAULT_MODEL_ADDRESS}; tcp://127.0.0.1:* picks a port)")
    parser.add_argument("--models-dir", action="append", default=None, metavar="DIR",
                        help="artifact folder (repeatable; default: packaged models and $PHASESTREAM_MODELS)")
    parser.add_argument("--max-request-mb", type=_megabytes, default=256.0, help="largest request accepted (MB)")
    parser.add_argument("--max-batch-mb", type=_megabytes, default=None,
                        help="a batch takes no more requests once they hold this many MB (default --max-request-mb)")
    parser.add_argument("--max-connections", type=int, default=32, metavar="N",
                        help="clients connected at once; more are refused (default 32)")
    parser.add_argument("--preload", nargs="*", default=[], metavar="NAME[:VERSION]",
                        help="models to load at start-up")


def config_from_args(args: argparse.Namespace) -> ModelServerConfig:
    folders = None
    if args.models_dir:
        from phasestream.models.registry import PRETRAINED_DIR

        folders = [str(PRETRAINED_DIR), *args.models_dir]
    batch = getattr(args, "max_batch_mb", None)
    return ModelServerConfig(bind=args.bind, max_request_bytes=int(args.max_request_mb * (1 << 20)),
                             max_batch_bytes=None if batch is None else int(batch * (1 << 20)),
                             max_connections=getattr(args, "max_connections", 32),
                             folders=folders, preload=list(args.preload)).validate()
