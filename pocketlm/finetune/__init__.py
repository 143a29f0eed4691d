"""Fine-tuning: start from a pretrained model (Hugging Face, a pocketlm run, nanoGPT), adapt it, chat with it.

The training loop stays the one in `pocketlm.train`; this package supplies what differs through its hooks:
where the model comes from and how it is saved (`run.Pretrained`, a ModelSource), and what a batch is
(`tasks.ReplayTask`, `sft.SFTTask`).
"""
