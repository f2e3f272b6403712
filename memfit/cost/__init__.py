"""Cost model: from a captured graph to the memory and time of a step, predicted or measured.

``timeline`` replays a graph's storage events; ``simulate`` adds kernel workspaces and says where
the peak falls; ``layers`` runs single layers of a step alone on real inputs, for ``workspace``,
which calibrates those workspaces, and ``timing``, which times every node's forward and backward
(what the planners price recomputation by); ``parallel`` rewrites the step into one process's
under DDP or FSDP; ``measurement`` runs a real step against the allocator, the ground truth every
prediction is tested against.
"""
