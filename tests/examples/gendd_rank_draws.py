"""Run under ``torch.distributed.run`` (gloo, CPU): a short GenDD tiny run, recording the random choices
(timesteps, noise, CFG-drop mask, mixup) of every GenDD step on this rank into ``<out>/draws<rank>.pt``.
Arguments after the first (the output folder) go to ``examples/gendd/train.py``."""
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from ddg_losses import GenDDLoss  # noqa: E402
from examples.gendd import train  # noqa: E402


def main():
    out, argv = Path(sys.argv[1]), sys.argv[2:]
    torch.set_num_threads(1)
    draws = []
    original = GenDDLoss.draw

    def recording(self, batch, device, generator=None):
        d = original(self, batch, device, generator)
        if self.training:
            draws.append({"timesteps": d.timesteps.clone(), "noise": d.noise.clone(), "keep": d.keep.clone(),
                          "mix": d.mix, "permutation": d.permutation})
        return d

    GenDDLoss.draw = recording
    train.main(["--out", str(out / "run")] + argv)
    torch.save(draws, out / f"draws{os.environ['RANK']}.pt")


if __name__ == "__main__":
    main()
