"""`python -m sdengine.cli ...`: the same as the `sdengine` command."""
from . import main

main()
