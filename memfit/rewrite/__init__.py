"""Rewrite: the only code that changes graphs.

``checkpoint`` turns a Plan into a module whose segments run under torch.utils.checkpoint;
``distributed`` wraps a planned module for DDP or FSDP by its layers.
"""
