"""gpt2-scratch: GPT-2 rebuilt from scratch in plain PyTorch.

The library (model, tokenizer, inference, data, training loop) lives in this package; the stages
(`gpt2 prepare`, `pretrain`, `finetune`, `dpo`, `reward`, `ppo`, `eval`, `generate`, `chat`, `serve`)
are thin entry points over it, registered in `gpt2.cli`.
"""

__version__ = "0.1.0"
