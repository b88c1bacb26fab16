"""Evaluation: AUC from Yes/No probabilities, ranking metrics, generation dumps."""
