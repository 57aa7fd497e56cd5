"""Tests of the knowledge layer: registry, priors, rates, inference, sampling."""
