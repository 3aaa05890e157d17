"""Test-wide settings."""

import torch

# Two cores, and notebook kernels or JupyterLab often run beside the test process: one intra-op
# thread avoids oversubscription, which on this machine costs far more than it gains.
torch.set_num_threads(1)
