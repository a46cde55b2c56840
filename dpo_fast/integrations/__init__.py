"""dpo_fast inside other trainers. Each integration is its own module and imports its host
library only when imported itself:

    from dpo_fast.integrations.trl import DPOTrainer      # needs trl (pip install "dpo_fast[trl]")
"""
