"""The closed sets of choices, each named once: signatures, CLI choices and Prefect forms use these.

Kept free of heavy imports, so the CLI can parse its flags without loading torch.
"""

from __future__ import annotations

from typing import Literal, get_args

# tiny, vit-b-32: CLIPs initialised at random; efficientnet-lite0: the pretrained ImageNet tower with a new text tower
Arch = Literal["tiny", "vit-b-32", "efficientnet-lite0"]
# full: train both towers on pixels; locked: the image tower frozen (its top ``unlock_blocks`` blocks
# excepted) and its activations kept, the text tower and projections train; prototype: learn value
# embeddings on frozen image embeddings
Mode = Literal["full", "locked", "prototype"]
# how the image tower computes; int8: dynamic quantization of its linear layers (CPU)
Backend = Literal["fp32", "int8", "bf16"]

ARCHS, MODES, BACKENDS = get_args(Arch), get_args(Mode), get_args(Backend)


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
