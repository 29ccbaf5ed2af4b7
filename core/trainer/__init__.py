"""The thin trainer: fms-hf-tuning's arguments over transformers' Trainer, with plugin stages."""

from ..quiet import silence_library_noise

silence_library_noise()  # before any trainer module imports transformers
