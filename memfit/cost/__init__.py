"""Cost model: from a captured graph to the memory of a step, predicted or measured.

``timeline`` replays a graph's storage events; ``simulate`` adds kernel workspaces and says where
the peak falls; ``workspace`` calibrates those workspaces on small real layers; ``parallel``
rewrites the step into one process's under DDP or FSDP; ``measurement`` runs a real step against
the allocator, the ground truth every prediction is tested against.
"""
