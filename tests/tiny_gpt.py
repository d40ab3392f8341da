"""The tiny GPT config that the training-loop tests share (train, checkpoint, appendix D).

Small enough that a few epochs take well under a second on a CPU; dropout on, so that exact
resumption and equal-to-the-book checks also cover the random masks. Test modules import it as
``from tiny_gpt import TINY_TRAINING`` (pytest puts this folder on the import path).
"""

TINY_TRAINING = {
    "vocab_size": 64,
    "context_length": 16,
    "emb_dim": 32,
    "n_heads": 4,
    "n_layers": 2,
    "drop_rate": 0.1,
    "qkv_bias": False,
}
