"""Recalibration of BatchNorm running statistics on sample data."""
