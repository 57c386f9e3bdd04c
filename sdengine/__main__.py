"""`python -m sdengine ...`: the same as the `sdengine` command."""
from .cli import main

main()
