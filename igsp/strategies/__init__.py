"""Built-in strategies: zero-shot, sequential fine-tuning and iGSP."""
