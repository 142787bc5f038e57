"""Prediction log, feedback export, retraining and the promotion gate."""
