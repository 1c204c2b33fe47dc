"""What the LoRA extract and merge tools of both families share (``networks/flux_extract_lora.py``,
``networks/sd3_extract_lora.py``, ``networks/flux_merge_lora.py``, ``networks/sd3_merge_lora.py``).

- ``families.py``: what differs between FLUX.1 and SD3 for these tools (one ``ToolFamily`` each).
- ``targets.py``: LoRA names <-> state-dict keys of a model part, from the architectures' target lists.
- ``lora_files.py``: reading LoRA files (sd-scripts or diffusers/PEFT keys), writing LoRAs and checkpoints.
- ``extract.py``: a LoRA from the difference of two checkpoints (SVD per layer).
- ``merge.py``: LoRAs into checkpoints tensor by tensor (every layout), and LoRAs into one LoRA (exact concat).
- ``cli.py``: the options and entry points of the four scripts.

Layouts (BFL, diffusers, SAI, prefixes, bundled text encoders) are library/models/layouts.py; the merge rule is
``networks.lora.merge_lora_weight``.
"""
