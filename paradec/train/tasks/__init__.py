"""Synthetic reasoning tasks for training and evaluating canvas models."""
