"""DP-DMD example: few-step distillation of a flow-matching teacher (2-D toy on CPU, SD3.5-M on GPUs)."""
