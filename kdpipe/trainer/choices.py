"""The choices of train-student options whose code needs torch (trainer/optimizers.py,
precision.py, execution.py), kept apart so that `--help` builds without importing torch."""

OPTIMIZERS = ("adamw", "adamw-8bit", "adafactor", "sgd")
PRECISIONS = ("auto", "fp32", "bf16-mixed", "bf16-master")
# Run folders written before --precision held --dtype (autocast only): its values here.
FROM_DTYPE = {"auto": "auto", "float32": "fp32", "bfloat16": "bf16-mixed"}
ATTN_IMPLEMENTATIONS = ("sdpa", "flash_attention_2", "eager")
