"""`python -m tunefile.compiler ...`: the `tunefile` command where its console script is not on PATH
(a `pip install --target` directory, an unactivated environment)."""

from .cli import main

main()
