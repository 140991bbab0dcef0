"""grpo-lightning: offline GRPO training of language models on verifiable tasks.

    python -m grpo_lightning fit --config configs/sat_tiny.yaml
"""

__version__ = "0.1.0"
