"""Shared code of the low-precision CIFAR-10 ResNet project: formats, casts, model, data, loop."""
