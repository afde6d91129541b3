"""What several stages share about models: loading the base and its tokenizer, device and dtype,
the chat format, probes and parity checks, constants. Below every stage; imports no stage."""
