"""TTRV: label-free test-time reinforcement learning for vision-language models.

The engine is a library of small modules; nothing heavy is imported here.
"""

import logging

__version__ = "0.1.0"

# `import peft` imports bitsandbytes, whose CPU backend then warns on every run that the
# optional `kernels` package (fetched from the hub at run time) is missing: noise for the
# float runs that never use 4-bit, and unfixable offline. Errors still show.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
