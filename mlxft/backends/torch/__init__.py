"""The PyTorch backend: model loading through transformers, LoRA through PEFT, the SFT step, evaluation."""

# Eager PyTorch pays nothing for a new batch width, so batches are padded to their longest row:
# every padding token is wasted work (measured: DPO pairs padded to 16 lost ~10% of a step).
PAD_MULTIPLE = 1
SHARED_PROMPT_PAD_MULTIPLE = 1  # DPO's shared-prompt layout: the same reasoning
SHARED_PROMPT_FEW_WIDTHS = False
