"""Offline data sets shipped with the project's dependencies."""
