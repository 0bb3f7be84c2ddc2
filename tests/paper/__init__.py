"""Tests of the paper application, `accumulate.paper`."""
