"""The training methods, each written once over a backend engine (mlxft.backends.engine): sft
(`mlxft lora`), dpo and its relatives, reward (reward models) and rl (online RL). Each module
reads top to bottom: setup, model, data, optimizer and step, loop, save."""
