"""Suite-wide settings: one torch thread per test worker (pytest -n 2 on 2 cores), no plot windows."""

import matplotlib
import torch

matplotlib.use("Agg")
torch.set_num_threads(1)
