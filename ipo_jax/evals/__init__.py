"""Evaluations: the RewardBench taxonomy and evaluator, the judges, reports and plots."""
