"""Vision-language models: only what differs for images.

- ``modality``: the image road (loading, codec, targets, settings refused) and the choice of
  a run's road;
- ``collate``: the processor's side: image tokens, labels, batches and generation prompts;
- ``targeting``: which parts of a VLM are adapted, trained in full or frozen;
- ``models``: loading a VLM folder and its processor offline;
- ``demo``: the assembled SmolVLM-shaped demo.

Image records themselves are a data format (:mod:`lorakit.data.images`).
"""
