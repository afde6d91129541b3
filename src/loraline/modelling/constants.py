"""Values that several stages must agree on."""

# Label value that transformers' causal-LM loss (and ours) skips: prompt tokens, padding, the
# positions after an example's last token.
IGNORE_INDEX = -100
