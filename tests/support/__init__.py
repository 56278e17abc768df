"""Shared helpers of the tests (no tests here): the model families, data, trainers, reference computations."""
