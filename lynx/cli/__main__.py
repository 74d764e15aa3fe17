"""`python -m lynx.cli`: the same as the `lynx` console script."""

from lynx.cli import main

main()
