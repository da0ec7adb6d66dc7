"""GenDD example: stage 1 (optional), stage 2 (generative distribution distillation) and an
optional linear-probe stage, with CIFAR-100 / ImageNet presets and a CPU ``tiny`` preset on
scikit-learn's digits. Entry point: ``python examples/gendd/train.py --preset tiny``."""
