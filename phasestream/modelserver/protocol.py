"""The model server's protocol: addresses, operations, the dtype requests are checked in, errors.

Wire format (docs/contract.md, "Wire formats"): the server is a ROUTER; clients are DEALER (or REQ)
sockets sending one msgpack frame per request (arrays in the ``msgpack_numpy`` layout, never pickle)::

    request  {op: "health"|"list"|"encode"|"decode"|"enhance"|"denoise", model: str, version: str (optional),
              array: ndarray, options: {}, id: any (optional, echoed)}
    reply    {ok: bool, model, version, sha256, array (when any), error: str (when not ok), id}

``encode`` takes spectra (N, E) at the model's energies and replies with latent means (N, D) in
``array`` (and the mixture-component probabilities (N, K) in ``components`` with
``options: {components: true}``); ``decode`` takes latent points (N, D) and replies with normalized
spectra (N, E); ``enhance`` (InDI models) takes a low-quality image (Y, X) or images (N, Y, X) and
replies with the enhanced, ``scale``-times larger image(s) (``options: {domain, steps: N}``: ``domain``,
required, is the domain of the image(s), ``transmission``, ``od`` or ``counts``; an image of another domain
than the model's is refused with ``refused: "domain"``, a model whose validated gain over bicubic is below
1 dB with ``refused: "low_gain"`` unless ``allow_low_gain: true``, when the reply carries ``low_gain``;
``steps`` default the model's; ``demo`` in the reply marks a demonstration model); ``denoise`` (denoise
models) takes an OD stack (E, Y, X), NaN allowed, and replies with the denoised stack, ``components``
kept and ``seconds`` (``options: {fine_tune_steps: N}``, self-supervised fine-tuning on the stack first,
default 0). ``list`` replies ``models``: the artifacts' summaries; ``health`` replies ``status``,
``loaded`` models, ``uptime_s``, ``pid`` and ``stats`` (request, batch and item counters).

Arrays are validated after conversion to float32, the dtype the models compute in: a float64 value
beyond float32's range (1e308) is refused, not passed on as infinity. Every failure is a reply with
``ok: false`` (a field of the wrong type, unknown model or version, input not matching the model's
energies, non-finite values,
an array larger than ``max_request_bytes`` as float32, malformed or undecodable message, payload over
``max_request_bytes``); error texts are cut to ``MAX_ERROR_CHARS``, and neither arrays nor requests
are logged. The server keeps serving. Requests that arrive together for the same model and op are run
as one batch; when a batch fails inside the model, each of its requests is run again on its own, so a
request the model cannot take fails alone.
"""

from __future__ import annotations

import numpy as np

__all__ = ["DEFAULT_MODEL_ADDRESS", "MAX_ERROR_CHARS", "MODEL_DTYPE", "MODEL_OPS", "OPS", "ModelRefused",
           "ModelServerError", "ModelServerUnavailable", "truncated"]

DEFAULT_MODEL_ADDRESS = "tcp://127.0.0.1:5579"
OPS = ("health", "list", "encode", "decode", "enhance", "denoise")
MODEL_OPS = {"gmvae": ("encode", "decode"), "indi": ("enhance",), "denoise": ("denoise",)}
# what GMVAE.encode/decode, indi.enhance_image and denoise.denoise_stack cast their input to: requests are checked in it
MODEL_DTYPE = np.dtype(np.float32)
MAX_ERROR_CHARS = 1000


class ModelServerError(RuntimeError):
    """The model server replied ``ok: false``; the message is the server's error."""


class ModelRefused(ModelServerError):
    """The server refused to apply the model to this input (a reply with ``refused``: ``"domain"`` when the
    image is not in the model's training domain, ``"low_gain"`` when its validated gain is too small)."""


class ModelServerUnavailable(ConnectionError):
    """No reply from the model server within the timeout, after every retry."""


def truncated(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    """``text`` cut to ``limit`` characters (an error must not carry a huge repr back or into the log)."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text) - limit} more characters)"
