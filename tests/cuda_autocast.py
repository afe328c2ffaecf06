"""CUDA's autocast policy, emulated on the CPU, so code that passes under `--amp on` here also
runs on a GPU.

    with cuda_autocast_rules():        # then anything that enters torch.autocast("cpu", bfloat16)
        Trainer(cfg_with_amp_on).run()

CPU autocast and CUDA autocast cast different op lists. The differences that matter:
- CPU autocast runs linear algebra (`linalg.solve`, `eigh`, `inv`, ...) in float32 whatever its
  input; CUDA leaves those ops alone, and they have no bfloat16 kernel there: a bfloat16 input
  (from a matmul under autocast) is an error on a GPU. Here such a call raises as it would there.
- CUDA runs its "fp32" list (exp, log, pow, softmax, sums, norms, losses, ...) in float32; here
  those ops get float32 inputs too.
- CUDA lowers a few ops CPU autocast leaves alone (einsum, mv, addmv, addr, multi_dot) to bfloat16.
Only while CPU autocast is enabled: `torch.autocast("cpu", enabled=False)` turns the rules off,
as it turns CUDA's off there. Lists from PyTorch's autocast_mode.cpp (CUDA).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch.overrides import TorchFunctionMode

NO_BF16_KERNEL = {  # linear algebra without a bfloat16 CUDA kernel (cuSOLVER / MAGMA: float, double, complex)
    "solve", "solve_ex", "inv", "inv_ex", "inverse", "cholesky", "cholesky_ex", "eigh", "eigvalsh", "eig", "eigvals",
    "svd", "svdvals", "lstsq", "qr", "det", "slogdet", "logdet", "pinv", "pinverse", "lu", "lu_factor", "lu_factor_ex",
    "matrix_rank", "cholesky_solve", "triangular_solve", "solve_triangular", "quantile", "nanquantile",
}
CUDA_FP32 = {  # run in float32 on CUDA
    "acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal", "rsqrt", "sinh",
    "tan", "pow", "__pow__", "__rpow__", "softplus", "layer_norm", "group_norm", "norm", "frobenius_norm",
    "nuclear_norm", "cosine_similarity", "nll_loss", "kl_div", "l1_loss", "smooth_l1_loss", "huber_loss", "mse_loss",
    "binary_cross_entropy_with_logits", "dist", "pdist", "cdist", "renorm", "logsumexp", "softmax", "log_softmax",
    "cumprod", "cumsum", "sum", "prod", "vector_norm", "matrix_norm", "interpolate",
}
CUDA_LOWER_ONLY = {"einsum", "mv", "addmv", "addr", "multi_dot", "chain_matmul"}  # lowered on CUDA, not on CPU


def tensors_in(obj):
    """Every tensor in a nest of lists, tuples and dicts (a call's arguments, its result)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from tensors_in(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from tensors_in(o)


def _cast(obj, dtype):
    if isinstance(obj, torch.Tensor) and obj.is_floating_point():
        return obj.to(dtype)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cast(o, dtype) for o in obj)
    return obj


class CudaAutocastRules(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.refused: list[str] = []
        self.under_autocast = 0  # calls seen while CPU autocast was on: proof the rules were exercised

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not torch.is_autocast_enabled("cpu"):
            return func(*args, **kwargs)
        self.under_autocast += 1
        name = getattr(func, "__name__", "").removeprefix("linalg_")  # torch.linalg.eigh is "linalg_eigh"
        bf16 = any(t.dtype == torch.bfloat16 for t in tensors_in((args, kwargs)))
        if name in NO_BF16_KERNEL and bf16:
            self.refused.append(name)
            raise RuntimeError(f'"{name}" not implemented for \'BFloat16\' (CUDA autocast, emulated on the CPU)')
        if name in CUDA_FP32 and bf16:
            args, kwargs = _cast(args, torch.float32), {k: _cast(v, torch.float32) for k, v in kwargs.items()}
        elif name in CUDA_LOWER_ONLY:
            args, kwargs = _cast(args, torch.bfloat16), {k: _cast(v, torch.bfloat16) for k, v in kwargs.items()}
        return func(*args, **kwargs)


@contextmanager
def cuda_autocast_rules():
    """Inside, every `torch.autocast("cpu", dtype=torch.bfloat16)` follows CUDA's policy (see above)."""
    mode = CudaAutocastRules()
    with mode:
        yield mode
