"""The experiments on Batch Normalization: ``python -m train.experiments``.

They train the program's LeNet (and the BN paper's MLP) many times with the program's own
steps, model and data, and write plots and Markdown tables into ``docs/experiments/``:

    cli                     the command line: ``main``, the experiments by name
    protocol                the sizes every experiment reads (full and ``--quick``)
    runner                  many short training runs of the LeNet, cached by their spec
    report                  Markdown tables (mean ± std over the seeds) and plots
    claims_experiments      six experiments on the seed's claims about BN
    population_experiments  BN's test-time statistics: running averages, PreciseBN, FrozenBN
    fig1_experiment         the BN paper's Fig. 1, with and without BN
    scanned                 whole epochs compiled into one ``lax.scan``
    mlp                     the BN paper's sigmoid MLP, written with jaxbn's functional API

Nothing in the training program imports this package.
"""

from train.experiments.cli import EXPERIMENTS, main

__all__ = ["EXPERIMENTS", "main"]
