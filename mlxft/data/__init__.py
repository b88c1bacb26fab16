"""The framework-free data layer: rows -> prompts -> token ids + loss masks -> numpy batches.

Nothing under mlxft.data imports mlx or torch; both backends consume what it produces.
"""
