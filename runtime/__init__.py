"""tunefile's runtime: the trainer, data pipeline and tools that a bundle runs (never imports the compiler)."""

import logging

# transformers imports torchao whenever it is installed (the torchao extra: low-bit optimizers, QAT), and
# torchao then warns at import for each of its prebuilt C++ kernels that does not match the installed torch.
# tunefile uses none of those kernels (its torchao paths are torch.compile'd Python), so the warnings say
# nothing about the run; genuine torchao errors still show.
logging.getLogger("torchao").setLevel(logging.ERROR)
