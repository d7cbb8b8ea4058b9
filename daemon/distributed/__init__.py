"""Several devices in one box (``sdlive serve --gpus N``): the transformer's blocks split into a pipeline over ranks
(``torch.distributed``: NCCL on GPUs, gloo on the CPU), or whole sessions placed per device (``--mode shard``).

The pipeline runs the same sessions on every rank in lockstep: rank 0 (the daemon) sends every session command to
the others, and every rank runs the same ``StreamSession`` code, so caches, counters and decisions stay the same
everywhere. Only the DiT forward differs per rank: each rank runs the blocks it owns (``stage.StageEngine``), the
activations travel the ring per stream-batch slot, the first rank embeds, the last runs the head and sends the flow
back to rank 0, which alone holds the real VAE (``stage.ShadowVAE`` elsewhere). ``docs/architecture.md`` explains
it; ``pipeline.PipelineEngine`` is what the daemon sees.
"""
