"""`python -m ecar_infer.training` (and `torchrun ... -m ecar_infer.training`) is `ecar-train`."""
from .command import main

main()
