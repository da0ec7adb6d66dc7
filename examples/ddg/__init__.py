"""DDG on the DomainBed protocol: student backbones conditioning a frozen Stable Diffusion teacher, two stages,
SWAD (see README.md; run ``python examples/ddg/train.py --preset tiny``)."""
