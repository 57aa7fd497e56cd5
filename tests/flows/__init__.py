"""Tests of the invertible layers and the multi-scale Glow."""
