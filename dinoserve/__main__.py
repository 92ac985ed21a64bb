"""`python -m dinoserve` runs the CLI."""

from dinoserve.cli import main

main()
