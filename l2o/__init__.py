"""Learned optimizers beside MetaOptimize: networks, the optimizer that applies one, functional
unrolls and meta-training (see l2o/README.md)."""
