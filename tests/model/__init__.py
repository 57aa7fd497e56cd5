"""Tests of the TzK model: bits/dim, objective, sampling, save and load."""
