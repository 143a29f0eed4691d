"""pocketlm: train a small GPT on your own text, on your own machine, and use it anywhere."""

__version__ = "0.1.0"
