"""`python -m ecar_infer.training` (and `torchrun ... -m ecar_infer.training`) is `ecar-train`."""
from .train_cli import main

main()
