"""Training: the synthetic demo data, CNN fine-tuning with progressive unfreezing, VLM LoRA
fine-tuning, and the demo bundle builder that ties them together."""
