"""dlfs: a command-line experiment runner for the models of "Deep Learning from Scratch", chapter 7."""

__version__ = "0.1.0"
