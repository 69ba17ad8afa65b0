"""Fine-tuning runs: the loop, one step, the config, checkpoints, metrics, distributed runs.

- ``loop``: :func:`train`, a whole run top to bottom;
- ``inputs``: a run's data, templates and resume point, checked before any model loads;
- ``step``: one optimizer step's data order, loss, schedule and optimizer;
- ``config``: :class:`TrainConfig`, the YAML keys and CLI flags of ``lorakit train``;
- ``run_folder``: the output folder's layout, ``train_config.yaml`` (its one reader),
  leftovers, the adapter folder written as one unit;
- ``checkpoint``: checkpoints in the run folder, resuming;
- ``metrics``: ``metrics.jsonl``, TensorBoard, the loss plot;
- ``report``: what a run prints (settings, batch, the before/after table);
- ``distributed``: torchrun, DDP and FSDP2;
- ``statefile``: optimizer and RNG state as safetensors (no pickle).
"""
