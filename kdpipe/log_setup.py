"""How kdpipe's processes log: one line per record on stderr, and no warning about nothing used.

The command line and the experiment runner's worker processes call `configure_logging` once,
before anything imports the libraries whose loggers it tunes.
"""

from __future__ import annotations

import logging

# bitsandbytes warns on import (peft imports it), on CPUs with AVX512-BF16, that an optional
# package for its 4-bit CPU matmul is missing. kdpipe uses bitsandbytes for its 8-bit
# optimizers only, so the warning came with every train and evaluate and concerned nothing run.
QUIETED = ("bitsandbytes.backends.cpu.ops",)


def configure_logging(level: int = logging.INFO) -> None:
    """Log records at `level` and above to stderr as 'HH:MM:SS LEVEL logger: message'."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for name in QUIETED:
        logging.getLogger(name).setLevel(logging.ERROR)
