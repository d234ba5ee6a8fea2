"""Experiments that test the theory on your own machine: memory span (`memory`) and
n-gram baselines (`ngram`)."""
