"""The LISA trainer API: layer sampling, the Hugging Face Trainer callback, a training loop and `lisa-finetune`."""
