"""Root test configuration, loaded by pytest before any test module is imported.

TRITON_INTERPRET must be set before `triton` is first imported: triton.language's own @jit helpers (tl.max,
tl.sum, ...) are decorated at import, and torchrec (through fbgemm_gpu) imports triton as soon as any data or
model test module is collected. Set any later, the interpreter meets those helpers as compiled-only functions
("Cannot call @triton.jit'd outside of the scope of a kernel"). Without CUDA the Triton kernels can only run in
the interpreter anyway; on a CUDA machine the variable is left alone and the kernels compile for real.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
