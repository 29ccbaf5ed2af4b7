"""The thin trainer: fms-hf-tuning's arguments over transformers' Trainer, with plugin stages."""
