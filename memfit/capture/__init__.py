"""Capture: the model as a graph, and one training step dry-run on it.

``dryrun`` traces the model with torch.fx and runs a whole step under FakeTensorMode (nothing is
allocated) with the ``tracker`` recording every storage; the result is a ``graph.MemGraph``.
``trainstep`` is the one step that prediction and measurement both run; ``subgraph`` lets a dry
run see inside the checkpointed segments of a planned model.
"""
