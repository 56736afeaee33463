"""TTRV: label-free test-time reinforcement learning for vision-language models.

The engine is a library of small modules; nothing heavy is imported here.
"""

__version__ = "0.1.0"
