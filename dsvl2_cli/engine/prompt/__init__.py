"""The prompt: the tokenizer, conversations (messages) and the processor that tiles images."""
