"""Shared pieces of the benchmarks: data, models, a vmapped trainer, measurements.

* :mod:`.data`: MNIST-1D generated locally, train/validation/test splits and
  optional symmetric label noise.
* :mod:`.models`: small models in plain JAX (parameters are dict pytrees) and
  the loss/accuracy functions.
* :mod:`.train`: the optimizer builder (SGD or SAM + SGD), the training step
  and a trainer that runs every seed x hyperparameter combination as one
  vmapped, jitted computation.
* :mod:`.measure`: wall-clock timing of single steps and XLA FLOP counts.
* :mod:`.zoo`: the MLP, BatchNorm ResNet and Transformer of ``overhead.py``.
* :mod:`.cnn`, :mod:`.sweep`, :mod:`.noise`, :mod:`.stats`: the CNNs (a
  convolution as strided slices and one matmul), the sequential training
  sweep with collapse detection, label noise and paired statistics of
  ``generalization.py``.
* :mod:`.text`, :mod:`.sequence_models`: Shakespeare as a byte-level corpus
  (splits, training and evaluation windows, lines labelled by play) and small
  Flax Linen language models (causal Transformer, GRU) for
  ``language_model.py``.
"""
