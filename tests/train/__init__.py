"""Tests of paradec.train, one module per file (the trainer's torchrun tests apart)."""
