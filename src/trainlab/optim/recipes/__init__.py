"""Named optimizers: each module registers its paper's recipe as a short chain of shared transforms."""

from trainlab.optim.recipes import baselines  # noqa: F401
