"""The PyTorch backend: model loading through transformers, LoRA through PEFT, the SFT step, evaluation."""
