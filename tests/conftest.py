import os

import torch

# Without a GPU the Triton kernels run under Triton's CPU interpreter; it must be chosen before they are defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
