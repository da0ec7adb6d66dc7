"""Two CPU ranks (gloo) run DP-DMD's generator and student export the way the FSDP launch does.

accelerate does not shard on CPU (a MULTI_CPU run never becomes DistributedType.FSDP), so ``accelerator.prepare``
is replaced here by what accelerate's FSDP plugins do to a module: ``fsdp1`` wraps it with
``FullyShardedDataParallel`` (each JointTransformerBlock its own unit, use_orig_params) under the MixedPrecision
policy accelerate's plugin builds for bf16 (parameters, gradients and buffers in bf16); ``fsdp2`` applies
``fully_shard`` to each JointTransformerBlock and the root with bf16 parameters and fp32 gradient reduction.
The pipeline's own ``prepare_generator`` and ``export_student`` run on top. Each rank writes what it saw to
``<out>/rank<r>.json``; rank 0 also reloads the export with ``SD3Transformer2DModel.from_pretrained``.

    python -m torch.distributed.run --nproc_per_node 2 tests/examples/dpdmd_fsdp_ranks.py fsdp1 grid|export OUT

``grid``: one generator forward, the sigma grid and the timesteps the transformer saw; ``export``: also the
export, reloaded on rank 0.
"""
from __future__ import annotations

import json
import sys
import traceback
from datetime import timedelta
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from examples.dpdmd.pipeline import export_student, prepare_generator  # noqa: E402
from examples.dpdmd.presets import PRESETS  # noqa: E402


def tiny_sd3():
    """SD3.5-Medium's block structure (dual attention in block 0, RMS QK norm) at a width two ranks shard fast."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    model = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                  attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                  caption_projection_dim=16, pooled_projection_dim=8, pos_embed_max_size=8,
                                  dual_attention_layers=(0,), qk_norm="rms_norm")
    # The positional table is a persistent buffer, which FSDP1's bf16 buffer_dtype rounds in place. A student
    # loaded from the released (bf16) files holds bf16 values there already, for which the rounding is exact:
    # so does this one.
    model.pos_embed.pos_embed.copy_(model.pos_embed.pos_embed.bfloat16().float())
    return model


def fsdp_prepare(mode: str):
    from diffusers.models.attention import JointTransformerBlock

    def wrap(module):
        if mode == "fsdp1":
            from accelerate.utils import FullyShardedDataParallelPlugin
            from torch.distributed.fsdp import FullyShardedDataParallel
            from torch.distributed.fsdp.wrap import ModuleWrapPolicy

            plugin = FullyShardedDataParallelPlugin(fsdp_version=1)
            plugin.set_mixed_precision("bf16")
            return FullyShardedDataParallel(module, auto_wrap_policy=ModuleWrapPolicy({JointTransformerBlock}),
                                            mixed_precision=plugin.mixed_precision_policy, use_orig_params=True,
                                            device_id=torch.device("cpu"))
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for block in [m for m in module.modules() if isinstance(m, JointTransformerBlock)]:
            fully_shard(block, mp_policy=policy)
        return fully_shard(module, mp_policy=policy)

    def prepare(*objects):
        out = tuple(wrap(o) if isinstance(o, torch.nn.Module) else o for o in objects)
        return out if len(out) > 1 else out[0]
    return prepare


def main(mode: str, what: str, out: Path) -> None:
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs
    from diffusers import SD3Transformer2DModel

    accelerator = Accelerator(cpu=True, kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=30))])
    rank = accelerator.process_index
    student = tiny_sd3()
    unsharded = {k: v.detach().clone() for k, v in student.state_dict().items()}
    seen = []
    student.register_forward_pre_hook(lambda m, args, kw: seen.append(float(kw["timestep"].flatten()[0])),
                                      with_kwargs=True)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5)
    accelerator.prepare = fsdp_prepare(mode)
    generator, _ = prepare_generator(accelerator, student, optimizer, PRESETS["smoke"], 3.0)
    torch.manual_seed(1)
    cond = {"encoder_hidden_states": torch.randn(2, 5, 16), "pooled_projections": torch.randn(2, 8)}
    with torch.no_grad():
        generator(torch.randn(2, 4, 8, 8), cond)
    report = {"rank": rank, "timesteps_seen": seen, "sigmas": generator.sigmas.float().tolist(),
              "sigmas_dtype": str(generator.sigmas.dtype)}
    if what == "grid":
        (out / f"rank{rank}.json").write_text(json.dumps(report, indent=1))
        return
    try:
        export_student(accelerator, generator, out / "export")
    except Exception:  # the other rank goes on to the barrier below; the test reports this
        report["export_error"] = traceback.format_exc(limit=3)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process and "export_error" not in report:
        try:
            reloaded = SD3Transformer2DModel.from_pretrained(out / "export").state_dict()
            report["missing"] = sorted(set(unsharded) - set(reloaded))
            report["different"] = sorted(k for k in unsharded if k in reloaded and not (
                reloaded[k].shape == unsharded[k].shape and torch.equal(reloaded[k].float(), unsharded[k].float())))
            report["dtypes"] = sorted({str(v.dtype) for v in reloaded.values()})
        except Exception:
            report["reload_error"] = traceback.format_exc(limit=3)
    (out / f"rank{rank}.json").write_text(json.dumps(report, indent=1))
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], Path(sys.argv[3]))
