"""DDIS example: class alignment tokens (CAT), DAG-guided synthesis of an ImageFolder dataset and data-free KD,
with Stable Diffusion presets (ImageNet ResNet-34 -> ResNet-18, PACS) and a CPU ``tiny`` preset on
scikit-learn's digits. Entry point: ``python examples/ddis/train.py --preset tiny``."""
