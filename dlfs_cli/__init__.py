"""dlfs: a command-line experiment runner for the models of "Deep Learning from Scratch", chapter 7."""

import os

# trainer.deterministic=true on CUDA needs a fixed cuBLAS workspace, and torch reads this once, when the
# process first uses cuBLAS: set here, before any dlfs module imports torch, it holds for every run of the
# process (the second job of an in-process sweep or reproduction too). The size is cuBLAS's own default
# on Hopper (8 buffers of 4 MiB); a value the user set is kept.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

__version__ = "0.1.0"
