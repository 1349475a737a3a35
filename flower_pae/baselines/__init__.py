"""Baselines that users would pick instead of PAE, on the same devices, data and harness.

- :mod:`flower_pae.baselines.fedavg_lora`: FedAvg + LoRA (peft), adapters trained on the
  device with cross-entropy on the same label logits PAE corrects, averaged by the server.
- :mod:`flower_pae.baselines.split_lora`: split learning, the device's first ``split_layer``
  layers (frozen) and the server's rest with LoRA, trained on the states and labels the
  devices send.
"""
