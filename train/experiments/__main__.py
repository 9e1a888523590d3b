"""``python -m train.experiments``: runs :func:`train.experiments.cli.main`."""

from train.experiments.cli import main

main()
