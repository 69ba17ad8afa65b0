"""Fine-tuning runs: the loop, one step, the config, checkpoints, metrics, distributed runs.

- ``loop``: :func:`train`, a whole run top to bottom;
- ``step``: one optimizer step's data order, loss, schedule and optimizer;
- ``config``: :class:`TrainConfig`, the YAML keys and CLI flags of ``lorakit train``;
- ``checkpoint``: checkpoints in the run folder, resuming;
- ``metrics``: ``metrics.jsonl``, TensorBoard, the loss plot;
- ``distributed``: torchrun, DDP and FSDP2;
- ``statefile``: optimizer and RNG state as safetensors (no pickle).
"""
