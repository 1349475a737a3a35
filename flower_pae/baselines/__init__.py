"""Baselines that users would pick instead of PAE, on the same devices, data and harness.

- :mod:`flower_pae.baselines.fedavg_lora`: FedAvg + LoRA (peft), adapters trained on the
  device with cross-entropy on the same label logits PAE corrects, averaged by the server.
- :mod:`flower_pae.baselines.split_lora`: split learning, the device's first ``split_layer``
  layers (frozen) and the server's rest with LoRA, trained on the states and labels the
  devices send.
- :mod:`flower_pae.baselines.mobillm`: MobiLLM-style side tuning, the device's frozen
  backbone forwards (every token's states of the selected layers, every round, labels in
  clear) and the server's ladder side network trained on them.

Their devices share :mod:`flower_pae.baselines.base`: PAE's shards and task schedule, and the
forward-only flow of split learning and MobiLLM.
"""
