"""Allow `python -m kdpipe ...` (and `torchrun -m kdpipe ...`)."""

from kdpipe.cli import main

main()
