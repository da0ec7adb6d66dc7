"""ddg_ops: fused C++/CUDA ops for diffusion-based distillation, with pure-PyTorch references.

Importing this package loads the compiled extension when it is built (see ddg_ops._ext
for DDG_DISABLE_EXT / DDG_REQUIRE_EXT) and registers fake kernels and autograd for the
``torch.ops.ddg`` operators. ``python -m ddg_ops.info`` reports what is in use.
"""
import torch  # noqa: F401  (load torch's libraries before the extension)

from ._ext import STATE as EXTENSION

if EXTENSION.loaded:
    from . import _autograd, _fake  # noqa: F401

from . import reference  # noqa: E402
from .guidance import *  # noqa: E402,F401,F403
from .guidance import __all__ as _guidance_all  # noqa: E402
from .bn_stats import *  # noqa: E402,F401,F403
from .bn_stats import __all__ as _bn_stats_all  # noqa: E402
from .split_token import *  # noqa: E402,F401,F403
from .split_token import __all__ as _split_token_all  # noqa: E402
from .diffusion_schedule import NOISE_SCHEDULES, GaussianDiffusionSchedule, space_timesteps  # noqa: E402

HAS_EXT = EXTENSION.loaded
__version__ = "0.1.0"
__all__ = ["EXTENSION", "HAS_EXT", "reference", "GaussianDiffusionSchedule", "NOISE_SCHEDULES", "space_timesteps",
           *_guidance_all, *_bn_stats_all, *_split_token_all]
